"""Tiny vision checkpoints in their real saving formats, and independent reference features.

Owns: writing random tiny transformers CLIP/SigLIP checkpoints (``save_pretrained``) and tiny
open_clip checkpoints (a model-config JSON, an ``open_clip_config.json`` and an
``open_clip_model.safetensors`` state dict) for the three families the open_clip backend
serves (native CLIP ViT, timm SigLIP ViT, timm EVA02), plus reference hidden states computed
through the original model objects (HF ``output_hidden_states``; forward hooks on the blocks
of an open_clip model while it runs ``encode_image``).

Assumes: open_clip's ``TimmModel`` passes no size kwargs to timm, so a tiny SigLIP-like
trunk (no CLS, MAP pooling) needs its own timm entry point: ``register_tiny_siglip`` adds one
named ``lvlm_test_tiny_siglip`` to timm's registry (test process only, idempotent).
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

HF_SIZE, HF_PATCH, HF_LAYERS, HF_WIDTH = 56, 14, 3, 32
TINY_SIGLIP = "lvlm_test_tiny_siglip"
_HF_VISION = {"hidden_size": HF_WIDTH, "intermediate_size": 64, "num_hidden_layers": HF_LAYERS,
              "num_attention_heads": 2, "image_size": HF_SIZE, "patch_size": HF_PATCH}
_HF_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
_OC_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


def save_hf(kind: str, path: Path) -> nn.Module:
    """Write a random tiny checkpoint (clip, clip_vision, siglip, siglip_vision); return its vision tower."""
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(vision_config=_HF_VISION, text_config=_HF_TEXT, projection_dim=16))
    elif kind == "clip_vision":
        model = CLIPVisionModel(CLIPVisionConfig(**_HF_VISION))
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=_HF_VISION, text_config=_HF_TEXT))
    elif kind == "siglip_vision":
        model = SiglipVisionModel(SiglipVisionConfig(**_HF_VISION))
    else:
        raise ValueError(kind)
    model.eval().save_pretrained(path)
    return getattr(model, "vision_model", model)


def hf_hidden_states(tower: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states [B, P + N, D] of the original HF tower (index 0 = embeddings)."""
    with torch.no_grad():
        return tower(pixel_values=x, output_hidden_states=True,
                     interpolate_pos_encoding=x.shape[-1] != tower.config.image_size).hidden_states


def register_tiny_siglip() -> None:
    """timm entry point: a SigLIP-style ViT (no CLS, MAP pool), width 32, 3 blocks, 56 px, 14 px patches."""
    if timm.is_model(TINY_SIGLIP):
        return
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def lvlm_test_tiny_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = {"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 3, "num_heads": 2,
                "mlp_ratio": 2.0, "class_token": False, "global_pool": "map"}
        return VisionTransformer(**{**args, **kwargs})

    register_model(lvlm_test_tiny_siglip)


def open_clip_model_cfg(family: str) -> dict:
    """Tiny model configs mirroring ViT-L-14-336, ViT-SO400M-14-SigLIP-384 and EVA02-L-14-336."""
    if family == "clip":
        return {"embed_dim": 16, "vision_cfg": {"image_size": 56, "layers": 3, "width": 32, "head_width": 16,
                                                "patch_size": 14}, "text_cfg": dict(_OC_TEXT)}
    if family == "siglip":
        register_tiny_siglip()
        return {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                "vision_cfg": {"image_size": 56, "timm_model_name": TINY_SIGLIP,
                               "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                "text_cfg": dict(_OC_TEXT, width=32, no_causal_mask=True, proj_bias=True, pool_type="last",
                                 norm_kwargs={"eps": 1e-6})}
    if family == "eva":
        return {"embed_dim": 32, "custom_text": True,
                "vision_cfg": {"image_size": 112, "timm_model_name": "eva02_tiny_patch14_224",
                               "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
                "text_cfg": dict(_OC_TEXT)}
    raise ValueError(family)


OPEN_CLIP_PREPROCESS = {"siglip": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}


def save_open_clip(family: str, path: Path) -> nn.Module:
    """Write model_config.json, open_clip_config.json and open_clip_model.safetensors.

    Returns the model as open_clip's own factory loads it back at the config's image size (a timm
    trunk is built at timm's default size, 224 for the tiny EVA02, and resized after loading).
    """
    path.mkdir(parents=True, exist_ok=True)
    cfg = open_clip_model_cfg(family)
    (path / "model_config.json").write_text(json.dumps(cfg))
    hub_cfg = {"model_cfg": cfg}
    if family in OPEN_CLIP_PREPROCESS:
        hub_cfg["preprocess_cfg"] = OPEN_CLIP_PREPROCESS[family]
    (path / "open_clip_config.json").write_text(json.dumps(hub_cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}").eval()  # no weights there yet: random init
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    size = cfg["vision_cfg"]["image_size"]
    return open_clip.create_model(f"local-dir:{path}", force_image_size=size).eval()


def open_clip_blocks(model: nn.Module) -> nn.ModuleList:
    visual = model.visual
    return visual.trunk.blocks if hasattr(visual, "trunk") else visual.transformer.resblocks


def open_clip_hidden_states(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """HF-style hidden states [B, P + N, D] of an open_clip model: block 0's input, then block outputs."""
    blocks = open_clip_blocks(model)
    states: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            model.encode_image(x)
    finally:
        for h in hooks:
            h.remove()
    return states
