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

import torch
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


class VisionEncoder(nn.Module, ABC):
    """Contract: embed dim, image size, mean/std, token count, feature layer, CLS policy, layer class."""

    def __init__(self, feature_layer: int = -2, keep_cls: bool = False) -> None:
        super().__init__()
        self.feature_layer = feature_layer
        self.keep_cls = keep_cls

    def set_contract(self, contract: EncoderContract) -> None:
        """Backends call this once built: every contract property below reads from it."""
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
    def layer_cls(self) -> type[nn.Module]:
        """Transformer block class (activation checkpointing, ZeRO-3 leaf modules)."""
        return self.contract.layer_cls

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks the features pass through."""
        return self.contract.num_layers

    def num_tokens(self, image_size: int | None = None) -> int:
        """Feature tokens per image at ``image_size`` (default: the encoder's resolution)."""
        side = (image_size or self.image_size) // self.patch_size
        return side * side + (self.num_prefix_tokens if self.keep_cls else 0)

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, num_tokens(), embed_dim]."""

    def image_transform(self) -> Callable:
        """PIL image -> normalised float tensor [3, image_size, image_size]."""
        size = self.image_size
        return T.Compose([
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])
