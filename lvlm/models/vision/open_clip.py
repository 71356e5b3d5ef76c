"""open_clip visual towers (OpenAI-style CLIP ViT, timm SigLIP/EVA trunks) behind ``VisionEncoder``.

Owns: resolving ``arch`` (an open_clip architecture name, a model-config JSON as open_clip's
``model_configs/*.json``, or an ``open_clip_config.json`` with ``model_cfg``/``preprocess_cfg``),
building it with random weights via ``open_clip.CLIP`` with a stub text tower (only ``.visual``
is kept, so no real text tower, which may need a hub config, is built), loading a local weights
file or a pretrained tag, resolution overrides, pruning after the feature layer, mean/std.

Assumes: transformers' hidden-state indices (0 = embeddings after the pre-norm, k = output of
block k, -1 = last block, before the final norm/pool); the tower is open_clip's
``VisionTransformer`` (one CLS token) or a ``TimmModel`` over a timm ViT-style trunk (``blocks``,
``num_prefix_tokens``, ``forward_intermediates``, ``set_input_size``); no ``toy://`` paths.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenCLIPViT
from torch import nn

from lvlm.config.schema import OpenCLIPVisionConfig
from lvlm.models.vision.base import EncoderContract, VisionEncoder
from lvlm.models.vision.hf import reject_toy_path, resolve_hidden_index

# Smallest valid text tower: ``open_clip.CLIP`` always builds one, and only ``.visual`` is kept.
_STUB_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class OpenCLIPArchInfo:
    """Contract values of an architecture, computed without materialising weights."""

    embed_dim: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    num_layers: int
    layer_cls: type[nn.Module]

    def num_tokens(self, keep_cls: bool = False) -> int:
        side = self.image_size // self.patch_size
        return side * side + (self.num_prefix_tokens if keep_cls else 0)


class _Embeddings(nn.Module):
    """Stands in for block 0 when the features are the embeddings (hidden-state index 0)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


@dataclass
class _Arch:
    name: str | None  # built-in architecture name (pretrained tags apply), None for a JSON file
    model_cfg: dict
    preprocess: dict = field(default_factory=dict)  # from an open_clip_config.json


def _load_arch(arch: str) -> _Arch:
    if not arch:
        raise ValueError("arch is empty: give an open_clip architecture name or a model-config .json path")
    reject_toy_path(arch, "arch")
    path = Path(arch)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        path = path / "open_clip_config.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        model_cfg, preprocess = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
        missing = [k for k in ("embed_dim", "vision_cfg") if k not in model_cfg]
        if missing:
            raise ValueError(f"open_clip model config {arch!r} lacks {missing}; expected the schema of "
                             "open_clip's model_configs/*.json (embed_dim, vision_cfg, text_cfg)")
        return _Arch(None, model_cfg, preprocess)
    if path.suffix == ".json" or "/" in arch:
        raise FileNotFoundError(f"open_clip model config file not found: {arch!r}")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        names = open_clip.list_models()
        close = difflib.get_close_matches(arch, names, n=5)
        raise ValueError(f"unknown open_clip arch {arch!r}; close matches: {close or 'none'}; valid: one of "
                         f"open_clip.list_models() ({len(names)} names) or a model-config .json path")
    return _Arch(arch, model_cfg)


def _config_image_size(arch: _Arch) -> int:
    size = arch.model_cfg["vision_cfg"].get("image_size", 224)
    sides = set(size) if isinstance(size, (list, tuple)) else {size}
    if len(sides) != 1:
        raise ValueError(f"non-square image_size {size} in the open_clip config is not supported")
    return int(sides.pop())


def _build_visual(arch: _Arch, image_size: int | None = None) -> nn.Module:
    """open_clip visual tower with random weights; ``image_size`` rebuilds native towers at that size."""
    vision_cfg = dict(arch.model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # never fetch timm weights behind the user's back
    vision_cfg["patch_dropout"] = 0.0  # token count must not depend on train/eval mode
    if image_size is not None and not vision_cfg.get("timm_model_name"):
        vision_cfg["image_size"] = image_size
    quick_gelu = arch.model_cfg.get("quick_gelu", False)
    clip = open_clip.CLIP(arch.model_cfg["embed_dim"], vision_cfg, _STUB_TEXT_CFG, quick_gelu=quick_gelu)
    return clip.visual


def _tower(visual: nn.Module) -> tuple[nn.ModuleList, int, int, int, int]:
    """(blocks, embed_dim, patch_size, num_prefix_tokens, current image size) of a supported tower."""
    if isinstance(visual, OpenCLIPViT):
        return (visual.transformer.resblocks, visual.transformer.width, visual.patch_size[0], 1,
                visual.image_size[0])
    trunk = getattr(visual, "trunk", None)
    if isinstance(visual, TimmModel) and all(hasattr(trunk, a) for a in ("blocks", "num_prefix_tokens")):
        return (trunk.blocks, trunk.embed_dim, trunk.patch_embed.patch_size[0], trunk.num_prefix_tokens,
                trunk.patch_embed.img_size[0])
    inner = f" (trunk {type(trunk).__name__})" if trunk is not None else ""
    raise ValueError(f"unsupported open_clip vision tower {type(visual).__name__}{inner}; valid: open_clip's "
                     "VisionTransformer or a timm ViT-style trunk (e.g. vit_*, eva02_*)")


def _load_weights(visual: nn.Module, path: str, arch: str) -> None:
    """Load a full open_clip CLIP state dict or a visual-only one (keys with or without ``visual.``)."""
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(path, device="cpu")
    elif suffix in _WEIGHT_SUFFIXES:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    else:
        raise ValueError(f"unsupported weights file {path!r}; valid suffixes: {', '.join(_WEIGHT_SUFFIXES)}")
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"weights file {path!r} does not hold a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    own_pe = getattr(visual, "positional_embedding", None)  # native towers rebuilt at another size
    if isinstance(visual, OpenCLIPViT) and sd.get("positional_embedding", own_pe).shape != own_pe.shape:
        sd["positional_embedding"] = _resize_pos_embed(sd["positional_embedding"], visual.grid_size[0])
    missing, unexpected = visual.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights {path!r} do not fit the visual tower of arch {arch!r}: missing "
                         f"{sorted(missing)[:5]} ({len(missing)}), unexpected {sorted(unexpected)[:5]} "
                         f"({len(unexpected)})")


def _resize_pos_embed(pe: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, D] open_clip position table -> [1 + grid*grid, D] (CLS row kept, grid bicubic)."""
    cls_pe, grid_pe = pe[:1], pe[1:]
    old = math.isqrt(grid_pe.shape[0])
    grid_pe = grid_pe.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid_pe = F.interpolate(grid_pe.float(), size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([cls_pe, grid_pe.to(pe.dtype).permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _tag_cfgs(name: str | None) -> dict[str, dict]:
    tags = open_clip.list_pretrained_tags_by_model(name) if name else []
    return {t: open_clip.get_pretrained_cfg(name, t) for t in tags}


def _resolve_pretrained(arch: _Arch, pretrained: str) -> tuple[str | None, dict]:
    """(local weights path or None, pretrained-tag config or {})."""
    if not pretrained:
        return None, {}
    reject_toy_path(pretrained, "pretrained")
    if Path(pretrained).is_file():
        quick = [c.get("quick_gelu", False) for c in _tag_cfgs(arch.name).values()]
        if quick and all(quick) and not arch.model_cfg.get("quick_gelu"):
            warnings.warn(f"every open_clip tag of {arch.name} uses QuickGELU but this arch uses GELU; "
                          f"for such weights use the '{arch.name}-quickgelu' arch", stacklevel=3)
        return pretrained, {}
    if Path(pretrained).suffix in _WEIGHT_SUFFIXES or "/" in pretrained or arch.name is None:
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained!r} "
                                "(open_clip pretrained tags apply only to built-in arch names)")
    tags = _tag_cfgs(arch.name)
    if pretrained not in tags:
        raise ValueError(f"pretrained {pretrained!r} is neither a local file nor an open_clip tag of "
                         f"{arch.name}; valid tags: {', '.join(tags) or 'none'}")
    try:
        path = open_clip.download_pretrained(tags[pretrained])
        if not path:
            raise FileNotFoundError("the tag names no downloadable weights")
    except Exception as e:  # no network, no cache entry
        raise FileNotFoundError(
            f"the weights of open_clip tag {arch.name}/{pretrained} could not be found locally and could not "
            f"be downloaded ({type(e).__name__}: {e}); download them and pass the local file as pretrained"
        ) from e
    return path, tags[pretrained]


@functools.lru_cache(maxsize=1)
def _builtin_configs() -> dict[str, dict]:
    """Every built-in open_clip arch's model config (read once: ``get_model_config`` deep-copies each)."""
    return {name: open_clip.get_model_config(name) or {} for name in open_clip.list_models()}


def _family_cfgs(arch: _Arch) -> list[dict]:
    """The pretrained-tag configs that speak for ``arch``'s preprocessing: its own tags; for a model-config
    file, those of the built-in archs with the very same model config, else, for a SigLIP config (the only
    ones carrying ``init_logit_bias``, the sigmoid loss's bias), those of every built-in SigLIP arch."""
    if arch.name is not None:
        return list(_tag_cfgs(arch.name).values())
    configs = _builtin_configs()
    same = [name for name, cfg in configs.items() if cfg == arch.model_cfg]
    if not same and "init_logit_bias" in arch.model_cfg:
        same = [name for name, cfg in configs.items() if "init_logit_bias" in cfg]
    return [c for name in same for c in _tag_cfgs(name).values()]


def _mean_std(arch: _Arch, tag_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """open_clip_config.json preprocess_cfg > the tag's > what all tags of the arch's family agree on > OpenAI."""
    for source in (arch.preprocess, tag_cfg):
        if "mean" in source and "std" in source:
            return tuple(source["mean"]), tuple(source["std"])
    default = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    agreed = {(tuple(c.get("mean", default[0])), tuple(c.get("std", default[1]))) for c in _family_cfgs(arch)}
    return agreed.pop() if len(agreed) == 1 else default


_RESIZE_MODES = {"shortest": "crop", "squash": "squash", "longest": "pad"}  # open_clip's resize_mode -> ours


def _resize(arch: _Arch, tag_cfg: dict) -> str:
    """resize_mode as _mean_std finds mean/std (open_clip's default: shortest = crop)."""
    for source in (arch.preprocess, tag_cfg):
        if "resize_mode" in source:
            return _RESIZE_MODES.get(source["resize_mode"], "crop")
    agreed = {c.get("resize_mode", "shortest") for c in _family_cfgs(arch)}
    return _RESIZE_MODES.get(agreed.pop(), "crop") if len(agreed) == 1 else "crop"


class OpenCLIPVisionEncoder(VisionEncoder):
    """The visual tower of an open_clip model, pruned after the block ``feature_layer`` names.

    ``num_layers`` counts the blocks the features pass through; ``source_num_layers`` is the
    architecture's depth. ``feature_layer`` keeps its meaning relative to the architecture.
    """

    def __init__(self, arch: str, pretrained: str = "", feature_layer: int = -2, keep_cls: bool = False,
                 image_size: int | None = None, resize: str = "auto") -> None:
        super().__init__(feature_layer=feature_layer, keep_cls=keep_cls, resize=resize)
        spec = _load_arch(arch)
        weights, tag_cfg = _resolve_pretrained(spec, pretrained)
        if tag_cfg.get("quick_gelu"):  # the tag's weights were trained with QuickGELU
            spec.model_cfg = dict(spec.model_cfg, quick_gelu=True)
        target = image_size or _config_image_size(spec)
        visual = _build_visual(spec, image_size=target)
        blocks, embed_dim, patch_size, prefix, current = _tower(visual)
        layer_cls, self.source_num_layers = type(blocks[0]), len(blocks)
        self._hidden_index = resolve_hidden_index(feature_layer, self.source_num_layers)
        if weights is not None:
            _load_weights(visual, weights, arch)
        if current != target:  # timm trunks are built at timm's default size: resample positions
            visual.set_input_size(target)
        keep = [max(self._hidden_index - 1, 0)]  # blocks up to the feature layer (block 0 for index 0)
        if isinstance(visual, OpenCLIPViT):
            visual.prune_intermediate_layers(keep, prune_norm=True, prune_head=True)
            visual.attn_pool = visual.attn_pool_contrastive = None
        else:
            visual.trunk.prune_intermediate_layers(keep, prune_norm=True, prune_head=True)
            visual.head = nn.Identity()
        if self._hidden_index == 0:
            _tower(visual)[0][0] = _Embeddings()  # "block 0 output" is then its input
        mean, std = _mean_std(spec, tag_cfg)
        self.set_contract(EncoderContract(embed_dim, target, patch_size, prefix, tuple(mean), tuple(std), layer_cls,
                                          self._hidden_index, resize=_resize(spec, tag_cfg)))
        theirs = {ours: name for name, ours in _RESIZE_MODES.items()}[self.resize]
        open_clip.set_model_preprocess_cfg(visual, {"size": target, "mode": "RGB", "mean": mean, "std": std,
                                                    "interpolation": "bicubic", "resize_mode": theirs})
        self.visual = visual

    @classmethod
    def from_config(cls, cfg: OpenCLIPVisionConfig) -> OpenCLIPVisionEncoder:
        return cls(cfg.arch, pretrained=cfg.pretrained, feature_layer=cfg.feature_layer,
                   keep_cls=cfg.keep_cls, image_size=cfg.image_size, resize=cfg.resize)

    @classmethod
    def describe(cls, arch: str) -> OpenCLIPArchInfo:
        """Contract values of ``arch`` at its native size, from a weightless (meta-device) build."""
        spec = _load_arch(arch)
        with torch.device("meta"):
            visual = _build_visual(spec)
        blocks, embed_dim, patch_size, prefix, _ = _tower(visual)
        return OpenCLIPArchInfo(embed_dim, _config_image_size(spec), patch_size, prefix, len(blocks),
                                type(blocks[0]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, S, S]
        out = self.visual.forward_intermediates(
            pixel_values, indices=[max(self._hidden_index - 1, 0)], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        tokens = out["image_intermediates"][0]  # [B, N, D]
        if self.keep_cls and self.num_prefix_tokens:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # [B, P + N, D]
        return tokens
