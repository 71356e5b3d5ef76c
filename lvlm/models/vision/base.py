"""The VisionEncoder contract every backend implements.

A vision encoder maps pixels [B, 3, H, W] to patch features [B, n_tokens, embed_dim] taken
from hidden-state index ``feature_layer`` (negative counts from the end, -1 = last block),
optionally keeping the CLS/prefix tokens. It also owns the image transform (PIL -> tensor)
matching its resolution and normalisation, so data code never hard-codes either.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T


@dataclass(frozen=True)
class EncoderContract:
    """What the rest of lvlm may rely on about a built encoder."""

    embed_dim: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layer_cls: type[nn.Module]
    num_layers: int
    resize: str = "crop"
    """The backbone's own way to a square input (one of RESIZE_MODES): what ``model.vision.resize: auto`` uses."""


RESIZE_MODES = ("crop", "squash", "pad")


class VisionEncoder(nn.Module, ABC):
    """Contract: embed dim, image size, mean/std, token count, feature layer, CLS policy, layer class."""

    def __init__(self, feature_layer: int = -2, keep_cls: bool = False, resize: str = "auto") -> None:
        super().__init__()
        if resize != "auto" and resize not in RESIZE_MODES:
            raise ValueError(f"resize {resize!r} is not valid; choose auto or one of {', '.join(RESIZE_MODES)}")
        self.feature_layer = feature_layer
        self.keep_cls = keep_cls
        self._resize = resize

    def set_contract(self, contract: EncoderContract) -> None:
        """Backends call this once built: every contract property below reads from it."""
        if self.keep_cls and contract.num_prefix_tokens == 0:
            raise ValueError("model.vision.keep_cls is true but this tower puts no CLS / prefix token before its "
                             "patches (e.g. SigLIP): it would have no effect; set it false")
        self.contract = contract

    @property
    def embed_dim(self) -> int:
        """Width of the features handed to the connector."""
        return self.contract.embed_dim

    @property
    def image_size(self) -> int:
        """Square input resolution the encoder runs at."""
        return self.contract.image_size

    @property
    def patch_size(self) -> int:
        """Side of one patch in pixels."""
        return self.contract.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS/register tokens the backbone puts before the patches (0 for SigLIP)."""
        return self.contract.num_prefix_tokens

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel normalisation mean."""
        return self.contract.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel normalisation std."""
        return self.contract.std

    @property
    def resize(self) -> str:
        """How images become square inputs: the configured mode, or the backbone's own for ``auto``."""
        return self.contract.resize if self._resize == "auto" else self._resize

    @property
    def layer_cls(self) -> type[nn.Module]:
        """Transformer block class (activation checkpointing, ZeRO-3 leaf modules)."""
        return self.contract.layer_cls

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks the features pass through."""
        return self.contract.num_layers

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks the features pass through, in order (partial unfreezing)."""
        lists = [m for m in self.modules()
                 if isinstance(m, nn.ModuleList) and len(m) > 0 and isinstance(m[0], self.layer_cls)]
        return max(lists, key=len)

    def num_tokens(self, image_size: int | None = None) -> int:
        """Feature tokens per image at ``image_size`` (default: the encoder's resolution)."""
        side = (image_size or self.image_size) // self.patch_size
        return side * side + (self.num_prefix_tokens if self.keep_cls else 0)

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, num_tokens(), embed_dim]."""

    def image_transform(self) -> Callable:
        """PIL image -> normalised float tensor [3, image_size, image_size] (see ``ResizeCropNormalize``)."""
        return ResizeCropNormalize(self.image_size, self.mean, self.std, self.resize)

    def reference_transform(self) -> Callable:
        """The same transform as composed torchvision steps (crop: Resize short side + CenterCrop, as CLIP/
        open_clip preprocess; squash: Resize to (size, size), as SigLIP's; pad: LLaVA's expand-to-square with
        the mean colour, then Resize), ToTensor, Normalize: the yardstick ``image_transform`` is tested against."""
        size, mode = self.image_size, getattr(self, "resize", "crop")
        bicubic = T.InterpolationMode.BICUBIC
        steps = [T.Lambda(lambda im: im.convert("RGB"))]
        if mode == "pad":
            steps.append(T.Lambda(lambda im: pad_to_square(im, self.mean)))
        steps += [T.Resize((size, size), interpolation=bicubic)] if mode == "squash" else \
                 [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])


def pad_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with the mean colour (LLaVA's
    expand2square), so that after normalisation the padding is 0."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ResizeCropNormalize:
    """Bicubic resize to ``size`` x ``size`` + normalise in one PIL resize, the square taken by ``mode``: crop
    (short side to ``size`` + centre crop, the default), squash (the whole image, aspect ratio lost) or pad
    (``pad_to_square`` first).

    Equivalent to torchvision's Resize(size) -> CenterCrop(size) -> ToTensor -> Normalize, but the crop
    is mapped back to a box of the source image and resized in one step (no full-size intermediate),
    and the uint8 -> float conversion and normalisation are fused: ~30% less CPU per image in the
    data loader. Differs from the composed version by at most about one grey level (tested).
    A plain class (not a lambda) so data-loader workers can pickle it.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "crop") -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {mode!r} is not valid; choose one of {', '.join(RESIZE_MODES)}")
        self.size, self.mean, self.std, self.mode = size, tuple(mean), tuple(std), mode
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
        self.offset = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)

    def describe(self) -> dict:
        """The parameters that determine the output (e.g. for the MIR probe's digest)."""
        return {"transform": "resize-normalize", "size": self.size, "mean": self.mean, "std": self.std,
                "resize": self.mode}

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source-image box that Resize(size) + CenterCrop(size) would keep."""
        size = self.size
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.mode == "pad":
            image = pad_to_square(image, self.mean)
        box = (0.0, 0.0, *image.size) if self.mode == "squash" else self.box(*image.size)
        out = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        pixels = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float()   # [3, size, size] 0..255
        return pixels.mul_(self.scale).sub_(self.offset)
