"""Connectors (projectors) from vision features to LLM embeddings; each declares dims and token count.

linear, mlp (``base``); avg_pool, token_merge (``pooling``); c_abstractor; resampler; qformer.
"""
from lvlm.models.connectors.base import Connector
from lvlm.models.connectors.build import build_connector, check_fits

__all__ = ["Connector", "build_connector", "check_fits"]
