"""Helpers for the sequence-packing tests: a tiny random LVLM and hand-made TokenizedSamples.

Owns: building a tiny LVLM (tiny CLIP vision tower + tiny Llama/Qwen2 from ``model_fixtures`` /
``vision_fixtures``, loaded through ``build_lvlm`` with a chosen attention implementation),
deterministic PIL images, TokenizedSamples laid out as ``SampleTokenizer`` lays them out
(optional BOS, image spans of ``tokens_per_image`` placeholders, prompt labels -100, supervised
answer) and per-sample loss sums from logits. Assumes the word ids of the tiny tokenizer start
after its 4 special tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from model_fixtures import WORDS, save_llm
from PIL import Image
from vision_fixtures import save_hf

from lvlm.config.schema import HFVisionConfig, LLMConfig, ModelConfig
from lvlm.data.sample import ImageSegment
from lvlm.data.tokenize import IGNORE_INDEX, TokenizedSample
from lvlm.models.build import build_lvlm
from lvlm.models.lvlm import LVLM

FIRST_WORD_ID = 4  # after <pad> <unk> <s> </s>


def build_tiny_lvlm(root: Path, family: str = "llama", attn_implementation: str = "sdpa",
                    moca: bool = False) -> tuple[LVLM, Callable[[Image.Image], torch.Tensor]]:
    """A tiny random LVLM in eval mode plus its image transform."""
    llm_dir, vision_dir = root / f"llm-{family}", root / "clip"
    if not llm_dir.exists():
        save_llm(family, llm_dir)
    if not vision_dir.exists():
        save_hf("clip_vision", vision_dir)
    cfg = ModelConfig(vision=HFVisionConfig(name_or_path=str(vision_dir)),
                      llm=LLMConfig(name_or_path=str(llm_dir), attn_implementation=attn_implementation), moca=moca)
    torch.manual_seed(0)
    model, transform, _ = build_lvlm(cfg)
    if moca:  # move MoCa off its identity init so it actually changes image positions
        with torch.no_grad():
            for cal in model.moca.layers:
                cal.shift.normal_(0.0, 0.5)
    return model.eval(), transform


def image(index: int, size: int = 20) -> Image.Image:
    """A deterministic random-noise RGB image."""
    pixels = np.random.default_rng(index).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def tokenized_sample(model: LVLM, key: str, *, images: int, prompt: int, answer: int, bos: bool,
                     seed: int) -> TokenizedSample:
    """[bos?] + images x image span + prompt words (label -100) + answer words and EOS (supervised)."""
    rng = np.random.default_rng(seed)
    words = lambda n: [FIRST_WORD_ID + int(w) for w in rng.integers(0, len(WORDS), size=n)]  # noqa: E731
    ids: list[int] = []
    labels: list[int] = []
    if bos:
        ids.append(model.llm.bos_token_id)
        labels.append(IGNORE_INDEX)
    span = [model.image_token_id] * model.tokens_per_image
    for _ in range(images):
        ids.extend(span)
        labels.extend([IGNORE_INDEX] * len(span))
    prompt_ids = words(prompt)
    ids.extend(prompt_ids)
    labels.extend([IGNORE_INDEX] * len(prompt_ids))
    answer_ids = words(answer) + [model.llm.eos_token_id]
    ids.extend(answer_ids)
    labels.extend(answer_ids)
    segments = [ImageSegment(image(seed * 10 + k)) for k in range(images)]
    return TokenizedSample(input_ids=ids, labels=labels, images=segments, key=key)


def four_samples(model: LVLM) -> list[TokenizedSample]:
    """Four samples with 0-2 images; the third has no BOS and a supervised first token."""
    bos = model.llm.bos_token_id is not None
    return [
        tokenized_sample(model, "s0", images=1, prompt=3, answer=5, bos=bos, seed=1),
        tokenized_sample(model, "s1", images=2, prompt=0, answer=4, bos=bos, seed=2),
        tokenized_sample(model, "s2", images=0, prompt=0, answer=6, bos=False, seed=3),
        tokenized_sample(model, "s3", images=1, prompt=2, answer=3, bos=bos, seed=4),
    ]


def span_loss(logits: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, int]:
    """Summed next-token CE of one sample from its own logits [n, V] and unshifted labels (n)."""
    target = torch.tensor(labels[1:], dtype=torch.long)
    keep = target != IGNORE_INDEX
    loss = F.cross_entropy(logits[:-1].float()[keep], target[keep], reduction="sum")
    return loss, int(keep.sum())


def forward_kwargs(batch: dict[str, Any], packed: bool) -> dict[str, Any]:
    """Model keyword arguments from a (packed) batch."""
    kwargs = {name: batch[name] for name in ("input_ids", "attention_mask", "labels", "pixel_values")}
    if packed:
        kwargs.update(position_ids=batch["position_ids"], sequence_ids=batch["sequence_ids"])
    return kwargs
