"""Connectors (projectors) from vision features to LLM embeddings; each declares dims and token count."""
from lvlm.models.connectors.base import Connector, build_connector

__all__ = ["Connector", "build_connector"]
