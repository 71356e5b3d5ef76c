"""C-Abstractor (Honeybee, Cha et al. 2024; MM1's "C-Abstractor"): convolutions keep locality while pooling.

[B, n_in, in] -> patch grid [B, in, s, s] -> ``num_blocks`` residual blocks (in -> hidden)
-> adaptive average pool to t x t (t = sqrt(tokens)) -> ``num_blocks`` residual blocks (hidden -> hidden)
-> [B, t*t, hidden] -> readout MLP Linear(hidden, out), SiLU, Linear(out, out) (Honeybee's mlp_depth 2).

The residual block is our own, written after Honeybee's use of timm's RegNet ``RegStage`` (bottle_ratio 1,
group_size 1, se_ratio 0.25, SiLU, LayerNorm2d): 1x1 conv -> depthwise 3x3 conv -> squeeze-excite -> 1x1
conv, LayerNorm over channels after each conv, SiLU, a residual (1x1 conv + norm when the width changes).
So the parameter count matches Honeybee's. Not reproduced: Honeybee's learned positional embedding
added to the features first (its size depends on the input token count, unknown when the connector is
built; the ViT features already carry position) and timm's weight initialisation (torch defaults here).
Token count: ``tokens`` (perfect square, at most the patch count). Needs a square patch grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvlm.models.connectors.base import Connector, grid_side, pooled_tokens, square_side, to_grid


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] at each position (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> 1x1 conv down -> ReLU -> 1x1 conv up -> sigmoid (timm SEModule)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, reduced, 1)
        self.up = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.up(F.relu(self.down(x.mean(dim=(2, 3), keepdim=True))))  # [B, C, 1, 1]
        return x * gate.sigmoid()


def _conv_norm(in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False),
                               LayerNorm2d(out_ch)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class ResBlock(nn.Module):
    """RegNet-style bottleneck with squeeze-excite and a residual: [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        self.conv1 = _conv_norm(in_ch, out_ch)
        self.conv2 = _conv_norm(out_ch, out_ch, kernel=3, groups=out_ch)  # depthwise 3x3
        self.se = SqueezeExcite(out_ch, max(1, round(in_ch * se_ratio)))
        self.conv3 = _conv_norm(out_ch, out_ch, act=False)
        self.shortcut = nn.Identity() if in_ch == out_ch else _conv_norm(in_ch, out_ch, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.shortcut(x))


class CAbstractor(Connector):
    """Residual conv blocks, adaptive average pool to ``tokens``, residual conv blocks, readout MLP."""

    name = "c_abstractor"
    needs_grid = True

    def __init__(self, in_dim: int, out_dim: int, tokens: int = 64, num_blocks: int = 3,
                 hidden_size: int = 0) -> None:
        super().__init__(in_dim, out_dim)
        if num_blocks < 1:
            raise ValueError(f"connector {self.name}: model.connector.num_blocks must be >= 1, got {num_blocks}")
        if hidden_size < 0:
            raise ValueError(f"connector {self.name}: model.connector.hidden_size must be >= 0, got {hidden_size}")
        self.side = square_side(tokens, self.name)
        hidden = hidden_size or in_dim
        self.before = nn.Sequential(*[ResBlock(in_dim if i == 0 else hidden, hidden) for i in range(num_blocks)])
        self.after = nn.Sequential(*[ResBlock(hidden, hidden) for _ in range(num_blocks)])
        self.readout = nn.Sequential(nn.Linear(hidden, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def num_tokens(self, n_in: int) -> int:
        return pooled_tokens(self.side, n_in, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, in] -> [B, tokens, out]
        self.num_tokens(x.shape[1])
        grid = self.before(to_grid(x, grid_side(x.shape[1], self.name)))  # [B, hidden, s, s]
        grid = self.after(F.adaptive_avg_pool2d(grid, self.side))  # [B, hidden, t, t]
        return self.readout(grid.flatten(2).transpose(1, 2))  # [B, t*t, out]
