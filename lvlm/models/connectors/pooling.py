"""Grid-reducing connectors without attention: MM1 average pooling and VILA's k x k token merge.

Both read the input as a square patch grid (row-major, no CLS/prefix token) and end in an MLP
built like ``MLPConnector``'s. Token counts:
- ``avg_pool``: ``tokens`` (a perfect square, at most the patch count); adaptive average pooling, so
  a side that is not a multiple of sqrt(tokens) gets windows of uneven size (torch's rule).
- ``token_merge``: ceil(side / k)^2; a side not divisible by k is zero-padded at the bottom and
  right before merging, as VILA's ``DownSampleBlock`` does (24 -> 12 x 12 with k=2; 27 -> 14 x 14).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvlm.models.connectors.base import Connector, grid_side, mlp, pooled_tokens, square_side, to_grid


class AvgPoolConnector(Connector):
    """MM1 "average pooling": adaptive 2D average pool to sqrt(tokens)^2 tokens, then an MLP."""

    name = "avg_pool"
    needs_grid = True

    def __init__(self, in_dim: int, out_dim: int, tokens: int = 64, depth: int = 2,
                 activation: str = "gelu") -> None:
        super().__init__(in_dim, out_dim)
        self.side = square_side(tokens, self.name)
        self.mlp = mlp(in_dim, out_dim, depth, activation)

    def num_tokens(self, n_in: int) -> int:
        return pooled_tokens(self.side, n_in, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, in] -> [B, tokens, out]
        self.num_tokens(x.shape[1])
        grid = to_grid(x, grid_side(x.shape[1], self.name))  # [B, in, side, side]
        pooled = F.adaptive_avg_pool2d(grid, self.side)  # [B, in, t, t]
        return self.mlp(pooled.flatten(2).transpose(1, 2))  # [B, t*t, out]


class TokenMergeConnector(Connector):
    """VILA's k x k merge: space-to-depth on the patch grid ([B, s/k * s/k, k*k*in]), LayerNorm, MLP."""

    name = "token_merge"
    needs_grid = True

    def __init__(self, in_dim: int, out_dim: int, kernel: int = 2, depth: int = 2,
                 activation: str = "gelu") -> None:
        super().__init__(in_dim, out_dim)
        if kernel < 1:
            raise ValueError(f"connector {self.name}: model.connector.kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        self.norm = nn.LayerNorm(in_dim * kernel * kernel)
        self.mlp = mlp(in_dim * kernel * kernel, out_dim, depth, activation)

    def num_tokens(self, n_in: int) -> int:
        merged = -(-grid_side(n_in, self.name) // self.kernel)  # ceil(side / k)
        return merged * merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, in] -> [B, ceil(s/k)^2, out]
        b, n, c = x.shape
        side, k = grid_side(n, self.name), self.kernel
        grid = x.reshape(b, side, side, c)  # [B, H, W, C]
        pad = (-side) % k
        if pad:  # zero rows at the bottom, zero columns at the right (VILA)
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        m = (side + pad) // k
        blocks = grid.reshape(b, m, k, m, k, c).permute(0, 1, 3, 2, 4, 5)  # [B, m, m, k, k, C]
        return self.mlp(self.norm(blocks.reshape(b, m * m, k * k * c)))  # [B, m*m, out]
