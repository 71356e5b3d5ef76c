"""Q-Former connector (BLIP-2, Li et al. 2023; the MIR paper's connector comparison).

Built on transformers' ``Blip2QFormerModel`` from a ``Blip2QFormerConfig`` (random init; no text input,
so only the query branch exists): ``tokens`` learned queries go through a LayerNorm, then ``layers``
BERT-style layers of self-attention over the queries, cross-attention to the vision features
(``encoder_hidden_size`` = the vision width; cross-attention every ``cross_attention_every`` layers,
BLIP-2: every other of 12) and a 4x GELU FFN (post-norm, dropout 0.1 as BLIP-2). A linear map takes the
query outputs to the LLM width: [B, n_in, in] -> [B, tokens, out]. Token count: ``tokens``, independent
of n_in. The queries are initialised N(0, 0.02) as in BLIP-2 (transformers' own init zeroes them).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from lvlm.models.connectors.base import Connector


class QFormerConnector(Connector):
    """Learned queries -> Blip2QFormerModel (cross-attending to the features) -> linear to the LLM width."""

    name = "qformer"

    def __init__(self, in_dim: int, out_dim: int, tokens: int = 32, layers: int = 2, heads: int = 8,
                 hidden_size: int = 768, cross_attention_every: int = 1) -> None:
        super().__init__(in_dim, out_dim)
        for key, value in (("tokens", tokens), ("layers", layers), ("heads", heads), ("hidden_size", hidden_size),
                           ("cross_attention_every", cross_attention_every)):
            if value < 1:
                raise ValueError(f"connector {self.name}: model.connector.{key} must be >= 1, got {value}")
        if hidden_size % heads:
            raise ValueError(f"connector {self.name}: model.connector.heads {heads} must divide "
                             f"model.connector.hidden_size {hidden_size}")
        config = Blip2QFormerConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=4 * hidden_size, encoder_hidden_size=in_dim,
                                    cross_attention_frequency=cross_attention_every,
                                    use_qformer_text_input=False)
        self.tokens = tokens
        self.qformer = Blip2QFormerModel(config)
        self.query = nn.Parameter(torch.empty(1, tokens, hidden_size))
        nn.init.normal_(self.query, std=config.initializer_range)
        self.proj = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_in, in] -> [B, tokens, out]
        query = self.query.expand(x.shape[0], -1, -1).to(x.dtype)  # [B, tokens, hidden]
        out = self.qformer(query_embeds=query, encoder_hidden_states=x).last_hidden_state
        return self.proj(out)
