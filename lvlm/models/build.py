"""build_lvlm(cfg.model): the only place an LVLM is built from config.

Dimensions flow from built modules: connector(in = vision.embed_dim, out = llm.hidden_size).
A connector that does not fit the encoder's tokens (a grid connector fed a CLS token, a pooled token
count larger than the patch grid) is refused here, at build time, with the config keys named.
"""
from __future__ import annotations

from typing import Callable

from lvlm.config.schema import ModelConfig
from lvlm.models.connectors import build_connector, check_fits
from lvlm.models.llm import build_llm
from lvlm.models.lvlm import LVLM
from lvlm.models.moca import MoCa
from lvlm.models.vision import build_vision


def build_lvlm(cfg: ModelConfig) -> tuple[LVLM, Callable, object]:
    """Returns (model, image_transform, tokenizer)."""
    vision = build_vision(cfg.vision)
    llm = build_llm(cfg.llm)
    connector = build_connector(cfg.connector, in_dim=vision.embed_dim, out_dim=llm.hidden_size)
    check_fits(connector, vision)
    connector.to(next(llm.parameters()).dtype)
    moca = MoCa(llm.num_layers, llm.hidden_size) if cfg.moca else None
    model = LVLM(vision, connector, llm, moca)
    return model, vision.image_transform(), llm.tokenizer
