"""TokenizedSamples -> one padded batch of tensors, images decoded and transformed.

Owns image decoding (``ImageSegment.load``), applying the image transform (PIL RGB image ->
float tensor ``[3, image_size, image_size]``) and right padding. A sample any of whose images
fails to decode is dropped and counted as ``corrupt_image``, before any tensor is built. If no
sample is left, the batch is one dummy sequence ``[pad]`` with attention 1, label -100 and no
image, so every rank still runs a forward pass while contributing no supervised token.

Batch keys: ``input_ids``, ``attention_mask``, ``labels`` (all long ``[B, L]``; labels -100 on
padding), ``pixel_values`` (float ``[N_images, 3, H, W]``, images in sample order then segment
order; ``[0, 3, H, W]`` when there is none), ``num_samples`` (real samples, 0 for the dummy),
``num_supervised_tokens`` (labels != -100), ``keys``, ``sources`` and ``lengths`` (each sample's key,
source name and token count, in order) and ``padding_waste`` (padded / all positions).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from PIL import Image

from lvlm.data.skips import SkipCounter
from lvlm.data.tokenize import IGNORE_INDEX, TokenizedSample

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _decode_all(sample: TokenizedSample) -> Optional[list[Image.Image]]:
    """All images of a sample, decoded; None if any is corrupt."""
    try:
        return [segment.load() for segment in sample.images]
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return None


def _transform(image: Image.Image, transform: ImageTransform, image_size: int, key: str) -> torch.Tensor:
    pixels = transform(image)
    if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != (3, image_size, image_size):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(
            f"image transform returned {got} for sample {key!r}; expected a tensor of shape "
            f"(3, {image_size}, {image_size})"
        )
    return pixels


def check_batch_args(pad_token_id: int, image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")


def decode_samples(samples: list[TokenizedSample], skips: Optional[SkipCounter], by_source: bool = False
                   ) -> list[tuple[TokenizedSample, list[Image.Image]]]:
    """(sample, its decoded images) for every sample whose images all decode; the others are counted
    as ``corrupt_image`` (``SOURCE/corrupt_image`` with ``by_source``, as a mixture files its reasons)
    and dropped."""
    kept = []
    for sample in samples:
        decoded = _decode_all(sample)
        if decoded is None:
            if skips is not None:
                skips.add(f"{sample.source}/corrupt_image" if by_source and sample.source else "corrupt_image")
            continue
        kept.append((sample, decoded))
    return kept


def dummy_batch(pad_token_id: int, image_size: int) -> dict[str, Any]:
    """One ``[pad]`` token, attention 1, no label, no image: every rank still runs a forward pass."""
    return {
        "input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long),
        "attention_mask": torch.ones((1, 1), dtype=torch.long),
        "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        "pixel_values": torch.zeros((0, 3, image_size, image_size), dtype=torch.float32),
        "num_samples": 0,
        "num_supervised_tokens": 0,
        "keys": [],
        "sources": [],
        "lengths": [],
        "padding_waste": 1.0,
    }


def stack_pixels(pixels: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """[N_images, 3, H, W] float32 (``[0, 3, H, W]`` when there is none)."""
    if pixels:
        return torch.stack(pixels).to(torch.float32)
    return torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)


def collate(
    samples: list[TokenizedSample],
    image_transform: ImageTransform,
    pad_token_id: int,
    image_size: int,
    skips: Optional[SkipCounter] = None,
    by_source: bool = False,
) -> dict[str, Any]:
    """Build a batch (see the module docstring for the keys); ``by_source``: see ``decode_samples``."""
    check_batch_args(pad_token_id, image_size)
    kept = decode_samples(samples, skips, by_source)
    if not kept:
        return dummy_batch(pad_token_id, image_size)

    length = max(len(sample.input_ids) for sample, _ in kept)
    batch_size = len(kept)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    pixels: list[torch.Tensor] = []
    for row, (sample, images) in enumerate(kept):
        n = len(sample.input_ids)
        if len(sample.labels) != n:
            raise ValueError(f"sample {sample.key!r}: {n} input ids but {len(sample.labels)} labels")
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
        pixels.extend(_transform(image, image_transform, image_size, sample.key) for image in images)

    pixel_values = stack_pixels(pixels, image_size)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "num_samples": batch_size,
        "num_supervised_tokens": int((labels != IGNORE_INDEX).sum().item()),
        "keys": [sample.key for sample, _ in kept],
        "sources": [sample.source for sample, _ in kept],
        "lengths": [len(sample.input_ids) for sample, _ in kept],
        "padding_waste": 1.0 - sum(len(sample.input_ids) for sample, _ in kept) / (batch_size * length),
    }
