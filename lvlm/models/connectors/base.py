"""Connector contract, the token-preserving connectors (linear, mlp) and shared helpers.

A connector maps [B, n_in, in_dim] vision features to [B, num_tokens(n_in), out_dim] LLM
embeddings. Dimensions come from the built encoder and LLM, never from config numbers.
Grid connectors (``needs_grid``) read the n_in tokens as a square patch grid in row-major order,
so they cannot take CLS/prefix tokens (``model.vision.keep_cls``); ``grid_side`` refuses a
non-square count with the values named.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
"""Activation name (config value) -> module class."""


class Connector(nn.Module):
    """Base: token-preserving by default; subclasses that pool override ``num_tokens``."""

    name = "connector"
    """The config type name (``model.connector.type``), used in error messages."""
    needs_grid = False
    """True when the input must be a square patch grid (no CLS/prefix tokens)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, n_in: int) -> int:
        """Output tokens per image for ``n_in`` input tokens."""
        return n_in


def mlp(in_dim: int, out_dim: int, depth: int, activation: str) -> nn.Sequential:
    """``depth`` linear layers (in -> out -> ... -> out) with ``activation`` between them."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if depth < 1:
        raise ValueError(f"MLP depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [ACTIVATIONS[activation](), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def square_side(tokens: int, name: str) -> int:
    """sqrt(tokens) for a configured output token count; refuses non-squares with the value named."""
    side = math.isqrt(max(tokens, 0))
    if tokens < 1 or side * side != tokens:
        raise ValueError(f"connector {name}: model.connector.tokens must be a perfect square > 0 "
                         f"(e.g. 16, 36, 64, 144, 256), got {tokens}")
    return side


def grid_side(n_in: int, name: str) -> int:
    """Side of the square patch grid of ``n_in`` tokens; refuses non-squares with the value named."""
    side = math.isqrt(max(n_in, 0))
    if n_in < 1 or side * side != n_in:
        raise ValueError(f"connector {name} needs a square patch grid, got {n_in} input tokens (not a square "
                         "number); a CLS/prefix token kept by model.vision.keep_cls counts too: set it false")
    return side


def pooled_tokens(out_side: int, n_in: int, name: str) -> int:
    """Tokens of a connector pooling the patch grid of ``n_in`` tokens to ``out_side`` x ``out_side``."""
    side = grid_side(n_in, name)
    if out_side > side:
        raise ValueError(f"connector {name}: model.connector.tokens {out_side ** 2} ({out_side}x{out_side}) "
                         f"exceeds the {side}x{side} patch grid ({n_in} tokens); pooling cannot add tokens: "
                         f"use tokens <= {n_in}")
    return out_side * out_side


def to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side*side, C] (row-major patches) -> [B, C, side, side]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class LinearConnector(Connector):
    """One linear map (LLaVA-1)."""

    name = "linear"

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, in] -> [B, n, out]
        return self.proj(x)


class MLPConnector(Connector):
    """``depth`` linear layers with an activation between them (LLaVA-1.5: 2 x GELU)."""

    name = "mlp"

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu") -> None:
        super().__init__(in_dim, out_dim)
        self.mlp = mlp(in_dim, out_dim, depth, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, in] -> [B, n, out]
        return self.mlp(x)
