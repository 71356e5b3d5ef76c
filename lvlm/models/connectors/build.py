"""build_connector: the one place a connector is built from config; ``check_fits``: the encoder/connector match.

Dimensions are passed in from the built encoder and LLM (in_dim = vision width, out_dim = LLM width).
"""
from __future__ import annotations

from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    ConnectorConfig,
    LinearConnectorConfig,
    MLPConnectorConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
)
from lvlm.models.connectors.base import Connector, LinearConnector, MLPConnector
from lvlm.models.connectors.c_abstractor import CAbstractor
from lvlm.models.connectors.pooling import AvgPoolConnector, TokenMergeConnector
from lvlm.models.connectors.qformer import QFormerConnector
from lvlm.models.connectors.resampler import PerceiverResampler


def build_connector(cfg: ConnectorConfig, in_dim: int, out_dim: int) -> Connector:
    """The one place a connector is built from config."""
    if isinstance(cfg, MLPConnectorConfig):
        return MLPConnector(in_dim, out_dim, depth=cfg.depth, activation=cfg.activation)
    if isinstance(cfg, LinearConnectorConfig):
        return LinearConnector(in_dim, out_dim)
    if isinstance(cfg, AvgPoolConnectorConfig):
        return AvgPoolConnector(in_dim, out_dim, tokens=cfg.tokens, depth=cfg.depth, activation=cfg.activation)
    if isinstance(cfg, TokenMergeConnectorConfig):
        return TokenMergeConnector(in_dim, out_dim, kernel=cfg.kernel, depth=cfg.depth, activation=cfg.activation)
    if isinstance(cfg, CAbstractorConnectorConfig):
        return CAbstractor(in_dim, out_dim, tokens=cfg.tokens, num_blocks=cfg.num_blocks,
                           hidden_size=cfg.hidden_size)
    if isinstance(cfg, ResamplerConnectorConfig):
        return PerceiverResampler(in_dim, out_dim, tokens=cfg.tokens, layers=cfg.layers, heads=cfg.heads,
                                  hidden_size=cfg.hidden_size)
    if isinstance(cfg, QFormerConnectorConfig):
        return QFormerConnector(in_dim, out_dim, tokens=cfg.tokens, layers=cfg.layers, heads=cfg.heads,
                                hidden_size=cfg.hidden_size, cross_attention_every=cfg.cross_attention_every)
    raise TypeError(f"no connector builder for {type(cfg).__name__}")


def check_fits(connector: Connector, vision) -> int:
    """Tokens per image of ``vision`` -> ``connector``; refuses a grid connector fed CLS/prefix tokens."""
    if connector.needs_grid and vision.keep_cls and vision.num_prefix_tokens > 0:
        raise ValueError(f"model.connector.type {connector.name} pools the square patch grid, but "
                         f"model.vision.keep_cls is true and the encoder puts {vision.num_prefix_tokens} CLS/prefix "
                         "token(s) before the patches: set model.vision.keep_cls false")
    return connector.num_tokens(vision.num_tokens())
