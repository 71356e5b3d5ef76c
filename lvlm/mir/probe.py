"""The MIR probe set: N images paired with unrelated texts, formatted as the paper does, tokenized.

Owns: seeded selection of images (webdataset shards) and texts (jsonl ``text`` field) and their
pairing, the selection hash, the chat formatting (``lvlm.data.chat``: the tokenizer's chat template when it
has one, else LLaVA v1: ``<system> USER: <image>\\n ASSISTANT: {text}</s>``), and the per-sample masks of
which positions are vision rows (image tokens) and text rows (every position after the image
span; the prefix before the image belongs to neither). Knows nothing of models beyond the
tokenizer and the token ids/counts it is handed.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

from lvlm.config.schema import MIRConfig
from lvlm.data.collate import collate
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource
from lvlm.data.tokenize import SampleTokenizer


@dataclass
class ProbeSet:
    batches: list[dict]
    """Collated batches (input_ids, attention_mask, pixel_values, vision_mask, text_mask)."""
    digest: str
    """sha256 of the selected image keys and text indices, in pairing order."""
    num_samples: int


def _read_texts(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line).get("text", "")
                if text.strip():
                    texts.append(text)
    return texts


def build_probe(cfg: MIRConfig, *, tokenizer, image_transform, image_size: int, image_token_id: int,
                tokens_per_image: int, bos_token_id: int | None, eos_token_id: int | None,
                pad_token_id: int) -> ProbeSet:
    rng = random.Random(f"lvlm.mir.probe/{cfg.seed}")
    refs = list(WebDatasetCaptionSource(cfg.images, name="mir_images").iter_refs(0, 0, SkipCounter()))
    texts = _read_texts(cfg.texts)
    if len(refs) < cfg.num_samples or len(texts) < cfg.num_samples:
        raise ValueError(f"MIR probe needs {cfg.num_samples} images and texts; found {len(refs)} images in "
                         f"{cfg.images!r} and {len(texts)} texts in {cfg.texts!r} (mir.num_samples)")
    chosen = rng.sample(range(len(refs)), cfg.num_samples)
    text_ids = rng.sample(range(len(texts)), cfg.num_samples)
    digest = hashlib.sha256(json.dumps([[refs[i].key for i in chosen], text_ids]).encode()).hexdigest()
    system = "" if getattr(tokenizer, "chat_template", None) else cfg.system_prompt  # a template has its own
    tok = SampleTokenizer(tokenizer, image_token_id=image_token_id, tokens_per_image=tokens_per_image,
                          max_length=cfg.max_length, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          system_prompt=system)
    samples = []
    for i, j in zip(chosen, text_ids):
        image = next(s for s in refs[i].load().segments if isinstance(s, ImageSegment))
        # one user turn holding only the image, the unrelated text as the assistant turn (render_chat)
        sample = Sample([image, TextSegment("", role="user"), TextSegment(texts[j], role="assistant")],
                        key=refs[i].key, source="mir_probe")
        tokenized = tok(sample)
        if tokenized is None:
            raise ValueError(f"probe sample {refs[i].key} does not fit mir.max_length={cfg.max_length}")
        samples.append(tokenized)
    batches = []
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start:start + cfg.batch_size]
        batch = collate(chunk, image_transform, pad_token_id, image_size)
        if batch["num_samples"] != len(chunk):
            raise ValueError("a probe image could not be decoded; use other mir.images")
        batches.append(add_row_masks(batch, image_token_id))
    return ProbeSet(batches=batches, digest=digest, num_samples=len(samples))


def add_row_masks(batch: dict, image_token_id: int) -> dict:
    """vision_mask: image-token positions; text_mask: attended positions after each sample's last image token."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    vision = ids == image_token_id  # [B, L]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    last_image = torch.where(vision, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values  # [B, 1]
    text = (pos > last_image) & (attn == 1) & (last_image >= 0)
    return {**batch, "vision_mask": vision, "text_mask": text}
