"""The MIR probe set: N images paired with unrelated texts, formatted as the paper does, tokenized.

Owns: seeded selection of images and texts from any configured data source (``mir.images``: each sample's
first image; ``mir.texts``: each sample's text) and their pairing, the selection hash, the chat formatting
(``lvlm.data.chat``: the tokenizer's chat template when it has one, else LLaVA v1:
``<system> USER: <image>\\n ASSISTANT: {text}</s>``), and the per-sample masks of which positions are
vision rows (image tokens) and text rows (every position after the image span; the prefix before the image
belongs to neither). Knows nothing of models beyond the tokenizer and the token ids/counts it is handed.

Selection: the sources' epoch-0 order for seed 0 (their refs: cheap, nothing decoded), ``mir.num_samples``
indices of each drawn by an RNG seeded with ``mir.seed``; only the chosen samples are loaded. A chosen image
sample without an image (a text-only record of a llava_json or interleaved source), that fails to load or
whose image does not decode is passed over and replaced by the next of a seeded order of the others (counted
in the probe's ``skipped``); likewise a text sample with no text. Sources where every sample qualifies
(webdataset captions, text documents) thus select exactly the first draw.

The digest identifies what the model is fed, not where it came from: per pair the sha256 of the image's
encoded bytes and the tokenized sample (text, chat formatting, max_length), plus the image transform's
parameters (or, for a transform without ``describe()``, the pixels). Same digest, same probe inputs.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from lvlm.config.schema import LLAVA_SYSTEM, MIRConfig, SourceConfig
from lvlm.data.collate import collate
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef, build_source
from lvlm.data.tokenize import SampleTokenizer


@dataclass
class ProbeSet:
    batches: list[dict]
    """Collated batches (input_ids, attention_mask, pixel_values, vision_mask, text_mask)."""
    digest: str
    """sha256 of the probe's content: images, token ids, image transform (module docstring)."""
    num_samples: int
    skipped: dict = field(default_factory=dict)
    """Samples passed over while selecting (reason -> count), and what the sources skipped while listing."""


def _refs(cfg: SourceConfig, role: str, skips: SkipCounter) -> list[SampleRef]:
    return list(build_source(cfg, name=f"mir_{role}").iter_refs(0, 0, skips))


def _image_of(sample: Sample) -> ImageSegment | None:
    """The sample's first image (None: it has none); OSError when it does not decode."""
    image = next((s for s in sample.segments if isinstance(s, ImageSegment)), None)
    if image is not None:
        try:
            image.load()
        except Exception as e:  # PIL raises many types for corrupt data
            raise OSError(f"probe image of {sample.key!r} does not decode: {e}") from e
    return image


def _image_digest(image: ImageSegment) -> str:
    if isinstance(image.data, bytes):
        return hashlib.sha256(image.data).hexdigest()
    return hashlib.sha256(f"{image.data.mode} {image.data.size}".encode() + image.data.tobytes()).hexdigest()


def _digest(images: list, samples: list, batches: list[dict], image_transform) -> str:
    """See the module docstring: what the model is fed, in pairing order."""
    describe = getattr(image_transform, "describe", None)
    if describe is not None:
        pixels = describe()
    else:
        h = hashlib.sha256()
        for batch in batches:
            h.update(batch["pixel_values"].numpy().tobytes())
        pixels = h.hexdigest()
    content = {"images": [_image_digest(image) for _, image in images],
               "input_ids": [list(sample.input_ids) for sample in samples], "transform": pixels}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _text_of(sample: Sample) -> str | None:
    text = "\n".join(s.text for s in sample.segments if isinstance(s, TextSegment) and s.text.strip())
    return text or None


def _select(refs: list[SampleRef], n: int, rng: random.Random, backup_seed: str, take: Callable, role: str,
            what: str, skips: SkipCounter) -> list[tuple[int, object]]:
    """``n`` (index, item) pairs: ``rng.sample`` of the indices, each unusable one (``take`` returns None or the
    load fails) replaced by the next index of a ``backup_seed``-seeded order of the rest."""
    if len(refs) < n:
        raise ValueError(f"MIR probe needs {n} {role}; {what} holds {len(refs)} (mir.num_samples)")
    first = rng.sample(range(len(refs)), n)
    chosen_set = set(first)
    backup = [i for i in range(len(refs)) if i not in chosen_set]
    random.Random(backup_seed).shuffle(backup)
    out = []
    for i in first:
        while True:
            try:
                item = take(refs[i].load())
                reason = f"mir_{role}_without_{'image' if role == 'images' else 'text'}"
            except OSError:
                item, reason = None, f"mir_{role}_unreadable"
            if item is not None:
                out.append((i, item))
                break
            skips.add(reason)
            if not backup:
                raise ValueError(f"MIR probe needs {n} {role}; fewer of those in {what} are usable "
                                 f"(passed over: {skips.as_dict()}) (mir.num_samples)")
            i = backup.pop()
    return out


def _describe(cfg: SourceConfig) -> str:
    return f"mir {SourceConfig.get_choice_name(type(cfg))} source " + ", ".join(
        f"{k}={v!r}" for k, v in vars(cfg).items() if isinstance(v, str) and v)


def build_probe(cfg: MIRConfig, *, tokenizer, image_transform, image_size: int, image_token_id: int,
                tokens_per_image: int, bos_token_id: int | None, eos_token_id: int | None,
                pad_token_id: int) -> ProbeSet:
    rng = random.Random(f"lvlm.mir.probe/{cfg.seed}")
    skips = SkipCounter()
    image_refs, text_refs = _refs(cfg.images, "images", skips), _refs(cfg.texts, "texts", skips)
    images = _select(image_refs, cfg.num_samples, rng, f"lvlm.mir.probe/{cfg.seed}/images", _image_of, "images",
                     _describe(cfg.images), skips)
    texts = _select(text_refs, cfg.num_samples, rng, f"lvlm.mir.probe/{cfg.seed}/texts", _text_of, "texts",
                    _describe(cfg.texts), skips)
    # a chat template has its own default system text: mir.system_prompt becomes a system message only when set
    templated = bool(getattr(tokenizer, "chat_template", None))
    system = "" if templated and cfg.system_prompt == LLAVA_SYSTEM else cfg.system_prompt
    tok = SampleTokenizer(tokenizer, image_token_id=image_token_id, tokens_per_image=tokens_per_image,
                          max_length=cfg.max_length, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          system_prompt=system)
    samples = []
    for (i, image), (_, text) in zip(images, texts):
        # one user turn holding only the image, the unrelated text as the assistant turn (render_chat)
        sample = Sample([image, TextSegment("", role="user"), TextSegment(text, role="assistant")],
                        key=image_refs[i].key, source="mir_probe")
        tokenized = tok(sample)
        if tokenized is None:
            raise ValueError(f"probe sample {image_refs[i].key} does not fit mir.max_length={cfg.max_length}")
        samples.append(tokenized)
    batches = []
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start:start + cfg.batch_size]
        batch = collate(chunk, image_transform, pad_token_id, image_size)
        if batch["num_samples"] != len(chunk):  # decoded once already in _select: a changed file
            raise ValueError("a probe image could not be decoded; use other mir.images")
        batches.append(add_row_masks(batch, image_token_id))
    rows = [sum(int(b[k].sum()) for b in batches) for k in ("vision_mask", "text_mask")]
    if min(rows) < 2:
        raise ValueError(f"the probe gives {rows[0]} vision rows (image tokens) and {rows[1]} text rows; each "
                         "covariance needs at least 2: raise mir.num_samples (or mir.max_length)")
    return ProbeSet(batches=batches, digest=_digest(images, samples, batches, image_transform),
                    num_samples=len(samples), skipped=skips.as_dict())


def add_row_masks(batch: dict, image_token_id: int) -> dict:
    """vision_mask: image-token positions; text_mask: attended positions after each sample's last image token."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    vision = ids == image_token_id  # [B, L]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    last_image = torch.where(vision, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values  # [B, 1]
    text = (pos > last_image) & (attn == 1) & (last_image >= 0)
    return {**batch, "vision_mask": vision, "text_mask": text}
