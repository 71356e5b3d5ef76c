"""The real backbones the shipped configs name, and reduced random copies of them that build offline.

``KNOWN`` maps every backbone name a config under ``configs/`` may use (a hub id of a transformers
checkpoint, or an open_clip architecture name) to what the real model is: its config class and exact
dimensions (transformers), or its open_clip architecture with the weight tags the configs may name, plus
the parameter count its name promises. A name missing here is a typo or a new backbone: add it with its
real dimensions (from the checkpoint's config.json, or open_clip's built-in model config).

``Reduced`` writes random copies of the same families at a tiny width and depth but the real image and
patch sizes (so token counts are the real ones) in the layouts lvlm loads by path: ``save_pretrained``
directories (LLM with a small locally built tokenizer; a full two-tower CLIP checkpoint) and open_clip
model-config JSON files. open_clip towers that are timm trunks (SigLIP, EVA02) get a reduced copy of the
same timm architecture registered under a test-only name (open_clip passes no size arguments to timm).

Nothing here reads the network; everything is built from configs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

WIDTH, LAYERS, HEADS = 64, 2, 4
"""The reduced width, depth and head count of every built backbone."""
TOLERANCE = 0.10
"""Real parameter counts may differ from the size in the name by this fraction (Vicuna-7B: 6.74B)."""


@dataclass(frozen=True)
class HFLLM:
    """A transformers causal LM: config class + the real config.json dimensions."""

    config_cls: type[PretrainedConfig]
    dims: dict
    nominal: float  # parameters the name promises (7e9 for "7b")
    bos: bool = True  # the tokenizer prepends BOS (Llama family); Phi-2/Qwen2 do not

    @property
    def layers(self) -> int:
        return self.dims["num_hidden_layers"]

    def real_config(self) -> PretrainedConfig:
        return self.config_cls(**self.dims)


@dataclass(frozen=True)
class HFVision:
    """A transformers two-tower CLIP checkpoint (lvlm reads its vision tower)."""

    config_cls: type[PretrainedConfig]
    vision: dict  # the real vision_config
    text: dict  # the real text_config
    projection_dim: int
    nominal: float  # vision-tower parameters
    prefix_tokens: int = 1  # CLS

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]

    @property
    def patch_size(self) -> int:
        return self.vision["patch_size"]

    @property
    def layers(self) -> int:
        return self.vision["num_hidden_layers"]


@dataclass(frozen=True)
class OpenCLIPArch:
    """An open_clip architecture (built-in model config, no download) and the weight tags configs may use."""

    width: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    prefix_tokens: int
    tags: tuple[str, ...]
    nominal: float  # visual-tower parameters


_LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
_LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False)
_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
_CLIP_TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    vocab_size=49408, max_position_embeddings=77)

KNOWN: dict[str, HFLLM | HFVision | OpenCLIPArch] = {
    # ---- LLMs (config.json of each hub checkpoint)
    "lmsys/vicuna-7b-v1.5": HFLLM(LlamaConfig, _LLAMA2_7B, 7e9),
    "meta-llama/Llama-2-7b-hf": HFLLM(LlamaConfig, _LLAMA2_7B, 7e9),
    "meta-llama/Meta-Llama-3-8B-Instruct": HFLLM(LlamaConfig, _LLAMA3_8B, 8e9),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": HFLLM(LlamaConfig, dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False), 1.1e9),
    "microsoft/phi-2": HFLLM(PhiConfig, dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4, layer_norm_eps=1e-5,
        tie_word_embeddings=False), 2.7e9, bos=False),
    "Qwen/Qwen2-7B": HFLLM(Qwen2Config, dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False), 7e9, bos=False),
    # ---- transformers vision checkpoints (two-tower CLIP; lvlm keeps the vision tower)
    "openai/clip-vit-large-patch14-336": HFVision(CLIPConfig, {**_CLIP_L, "image_size": 336}, _CLIP_TEXT_L,
                                                  projection_dim=768, nominal=0.30e9),
    # ---- open_clip architectures (open_clip's model_configs/*.json; timm trunks for SigLIP and EVA02)
    "ViT-L-14": OpenCLIPArch(1024, 24, 16, 224, 14, 1, ("openai", "dfn2b"), 0.30e9),
    "ViT-L-14-336": OpenCLIPArch(1024, 24, 16, 336, 14, 1, ("openai",), 0.30e9),
    "ViT-H-14-378-quickgelu": OpenCLIPArch(1280, 32, 16, 378, 14, 1, ("dfn5b",), 0.63e9),
    "EVA02-L-14-336": OpenCLIPArch(1024, 24, 16, 336, 14, 1, ("merged2b_s6b_b61k",), 0.30e9),
    "ViT-SO400M-14-SigLIP-384": OpenCLIPArch(1152, 27, 16, 384, 14, 0, ("webli",), 0.43e9),
}


def is_toy(name: str) -> bool:
    """``toy://`` names are the embedded default's own backbones (lvlm.toy), not hub models."""
    return name.startswith("toy://")


# ------------------------------------------------------------------------------------------ reduced builds

_WORDS = "a photo of the cat dog red blue on in and is . , image shows two three left right".split()


def tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer built locally (BOS only for families whose tokenizer adds one)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(_WORDS)], trainer=trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    extra = dict(bos_token="<s>") if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **extra)


def reduced_llm_config(entry: HFLLM, vocab_size: int) -> PretrainedConfig:
    """The real config with width, depth, heads and vocabulary shrunk (the KV-head ratio kept when it can be)."""
    dims = dict(entry.dims)
    ratio = dims["num_attention_heads"] // dims.get("num_key_value_heads", dims["num_attention_heads"])
    dims.update(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=max(1, HEADS // ratio), vocab_size=vocab_size)
    return entry.config_cls(**dims)


_STUB_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
"""A tiny text tower: open_clip.CLIP always builds one; lvlm keeps only ``.visual``."""


def _register_reduced_timm(real: str) -> str:
    """A timm entry point building ``real`` at the reduced size, under a test-only name (idempotent)."""
    import timm
    from timm.models import register_model

    name = f"lvlm_test_reduced__{real}"
    if timm.is_model(name):
        return name

    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return timm.create_model(real, pretrained=False, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS, **kwargs)

    build.__name__ = build.__qualname__ = name
    register_model(build)
    return name


def reduced_open_clip_config(arch: str) -> dict:
    """open_clip's built-in model config of ``arch`` with the visual tower shrunk (image and patch size kept)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise KeyError(f"open_clip has no built-in model config {arch!r}")
    vision = dict(cfg["vision_cfg"])
    if vision.get("timm_model_name"):
        vision["timm_model_name"] = _register_reduced_timm(vision["timm_model_name"])
    else:
        vision.update(width=WIDTH, layers=LAYERS, head_width=WIDTH // HEADS)
    out = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": dict(_STUB_TEXT)}
    if cfg.get("quick_gelu"):
        out["quick_gelu"] = True
    return out


class Reduced:
    """Reduced random backbones written under ``root``, each built once per name (cached)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, str] = {}

    def path(self, name: str) -> str:
        """The local path lvlm should load in place of the real backbone ``name``."""
        if name not in self._paths:
            entry = KNOWN[name]
            out = self.root / name.replace("/", "__")
            torch.manual_seed(0)
            if isinstance(entry, HFLLM):
                self._write_llm(entry, out)
            elif isinstance(entry, HFVision):
                self._write_clip(entry, out)
            else:
                out.mkdir(parents=True, exist_ok=True)
                out = out / "model_config.json"
                out.write_text(json.dumps(reduced_open_clip_config(name)))
            self._paths[name] = str(out)
        return self._paths[name]

    @staticmethod
    def _write_llm(entry: HFLLM, out: Path) -> None:
        from transformers import AutoModelForCausalLM

        tok = tokenizer(entry.bos)
        model = AutoModelForCausalLM.from_config(reduced_llm_config(entry, len(tok)))
        model.save_pretrained(out)
        tok.save_pretrained(out)

    @staticmethod
    def _write_clip(entry: HFVision, out: Path) -> None:
        vision = dict(entry.vision, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS)
        text = dict(entry.text, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=64, max_position_embeddings=8)
        CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(out)


# ------------------------------------------------------------------------------------ real sizes, weightless

def real_llm_params(entry: HFLLM) -> int:
    """Parameters of the real-size LLM, built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(entry.real_config())
    return params(model)


def real_vision_tower(name: str) -> torch.nn.Module:
    """The real-size vision tower of ``name``, built on the meta device (nothing allocated, nothing read)."""
    entry = KNOWN[name]
    with torch.device("meta"):
        if isinstance(entry, HFVision):
            from transformers import CLIPVisionConfig, CLIPVisionModel

            return CLIPVisionModel(CLIPVisionConfig(**entry.vision))
        import open_clip

        cfg = open_clip.get_model_config(name)
        return open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], _STUB_TEXT,
                              quick_gelu=cfg.get("quick_gelu", False)).visual


def open_clip_dims(visual: torch.nn.Module) -> dict:
    """width, layers, heads, image_size, patch_size, prefix_tokens of an open_clip visual tower (native or timm)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # timm ViT/EVA trunk
        return dict(width=trunk.embed_dim, layers=len(trunk.blocks), heads=trunk.blocks[0].attn.num_heads,
                    image_size=trunk.patch_embed.img_size[0], patch_size=trunk.patch_embed.patch_size[0],
                    prefix_tokens=trunk.num_prefix_tokens)
    blocks = visual.transformer.resblocks
    return dict(width=visual.transformer.width, layers=len(blocks), heads=blocks[0].attn.num_heads,
                image_size=visual.image_size[0], patch_size=visual.patch_size[0], prefix_tokens=1)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def within(count: float, nominal: float, tolerance: float = TOLERANCE) -> bool:
    return math.isclose(count, nominal, rel_tol=tolerance)
