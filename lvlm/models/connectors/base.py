"""Connector contract and factory.

A connector maps [B, n_in, in_dim] vision features to [B, num_tokens(n_in), out_dim] LLM
embeddings. Dimensions come from the built encoder and LLM, never from config numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from lvlm.config.schema import ConnectorConfig, LinearConnectorConfig, MLPConnectorConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Connector(nn.Module):
    """Base: token-preserving by default; subclasses that pool override ``num_tokens``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, n_in: int) -> int:
        """Output tokens per image for ``n_in`` input tokens."""
        return n_in


class LinearConnector(Connector):
    """One linear map (LLaVA-1)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, in] -> [B, n, out]
        return self.proj(x)


class MLPConnector(Connector):
    """``depth`` linear layers with an activation between them (LLaVA-1.5: 2 x GELU)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu") -> None:
        super().__init__(in_dim, out_dim)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(_ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [_ACTIVATIONS[activation](), nn.Linear(out_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, in] -> [B, n, out]
        return self.mlp(x)


def build_connector(cfg: ConnectorConfig, in_dim: int, out_dim: int) -> Connector:
    """The one place a connector is built from config."""
    if isinstance(cfg, MLPConnectorConfig):
        return MLPConnector(in_dim, out_dim, depth=cfg.depth, activation=cfg.activation)
    if isinstance(cfg, LinearConnectorConfig):
        return LinearConnector(in_dim, out_dim)
    raise TypeError(f"no connector builder for {type(cfg).__name__}")
