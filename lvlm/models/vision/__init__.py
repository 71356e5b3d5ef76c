"""Vision encoders: the ``VisionEncoder`` contract and ``build_vision``, the one place one is built.

Backends: ``hf`` (transformers CLIP/SigLIP vision towers) and ``open_clip`` (open_clip visual
towers, including timm SigLIP/EVA trunks). The backend is chosen by the config class; paths in
the config must already be resolved (no ``toy://``).
"""
from __future__ import annotations

from lvlm.config.schema import HFVisionConfig, OpenCLIPVisionConfig, VisionConfig
from lvlm.models.vision.base import VisionEncoder


def build_vision(cfg: VisionConfig) -> VisionEncoder:
    """Build the vision encoder ``cfg`` describes (weights loaded unless the config says random)."""
    if isinstance(cfg, HFVisionConfig):
        from lvlm.models.vision.hf import HFVisionEncoder
        return HFVisionEncoder.from_config(cfg)
    if isinstance(cfg, OpenCLIPVisionConfig):
        from lvlm.models.vision.open_clip import OpenCLIPVisionEncoder
        return OpenCLIPVisionEncoder.from_config(cfg)
    raise TypeError(f"no vision encoder builder for {type(cfg).__name__}; valid config types: "
                    "HFVisionConfig (type: hf), OpenCLIPVisionConfig (type: open_clip)")


__all__ = ["VisionEncoder", "build_vision"]
