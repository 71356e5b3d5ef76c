"""Perceiver resampler / attention pooling (Flamingo, Alayrac et al. 2022; MM1's "attention pooling").

``tokens`` learned queries (latents) are refined ``layers`` times by: pre-norm cross-attention whose
keys/values are the normed features concatenated with the normed latents (Flamingo), then a pre-norm
FFN (4x, GELU), each with a residual. A final LayerNorm and a linear map give [B, tokens, out_dim].
Features are first projected to ``hidden_size`` when it differs from the vision width (0 = the vision
width). Token count: ``tokens``, independent of n_in, so CLS/prefix tokens are simply attended to.
No positional embedding is added (Flamingo's are per-frame): the ViT features carry their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvlm.models.connectors.base import Connector


class ResamplerLayer(nn.Module):
    """Latents attend to (features + latents), then an FFN; both pre-norm with residuals."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                                 nn.Linear(4 * dim, dim, bias=False))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, heads, n, D / heads]
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_in = self.norm_latents(latents)  # [B, T, D]
        kv_in = torch.cat([self.norm_media(x), q_in], dim=1)  # [B, n_in + T, D]
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(self._split(self.to_q(q_in)), self._split(k), self._split(v))
        latents = latents + self.to_out(attn.transpose(1, 2).flatten(2))  # [B, T, D]
        return latents + self.ffn(latents)


class PerceiverResampler(Connector):
    """Learned queries pooled from the features by ``layers`` cross-attention layers; then a linear map."""

    name = "resampler"

    def __init__(self, in_dim: int, out_dim: int, tokens: int = 64, layers: int = 2, heads: int = 8,
                 hidden_size: int = 0) -> None:
        super().__init__(in_dim, out_dim)
        hidden = hidden_size or in_dim
        for key, value in (("tokens", tokens), ("layers", layers), ("heads", heads)):
            if value < 1:
                raise ValueError(f"connector {self.name}: model.connector.{key} must be >= 1, got {value}")
        if hidden_size < 0:
            raise ValueError(f"connector {self.name}: model.connector.hidden_size must be >= 0, got {hidden_size}")
        if hidden % heads:
            raise ValueError(f"connector {self.name}: model.connector.heads {heads} must divide the hidden size "
                             f"{hidden} (model.connector.hidden_size {hidden_size}; 0 = the vision width {in_dim})")
        self.tokens = tokens
        self.latents = nn.Parameter(torch.empty(tokens, hidden))
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.proj_in = nn.Identity() if hidden == in_dim else nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(ResamplerLayer(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, in] -> [B, tokens, out]
        x = self.proj_in(x)  # [B, n_in, hidden]
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, tokens, hidden]
        for layer in self.layers:
            latents = layer(latents, x)
        return self.proj(self.norm(latents))
