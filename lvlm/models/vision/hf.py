"""transformers vision towers (CLIP, SigLIP) behind the ``VisionEncoder`` contract.

Owns: reading a local or cached transformers checkpoint (a full CLIP/SigLIP model or a
vision-only one), choosing the vision class by ``config.model_type`` (``_FAMILIES``),
truncating the tower to the blocks that ``feature_layer`` needs, and the normalisation and resize mode
(``preprocessor_config.json`` when the checkpoint has one, else the family's default). Also the
two helpers both backends share: ``resolve_hidden_index`` and ``reject_toy_path``.

Assumes: hidden-state indices follow transformers' ``output_hidden_states`` (0 = embeddings,
k = output of block k, -1 = last block, all before the post-layernorm); the tower's
``last_hidden_state`` is its last block's output once ``post_layernorm``/``head`` are made
identities (true for CLIPVisionModel and SiglipVisionModel). ``toy://`` paths must have been
resolved by ``lvlm.toy`` before an encoder is built.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel, SiglipVisionModel
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from lvlm.config.schema import HFVisionConfig
from lvlm.models.vision.base import EncoderContract, VisionEncoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class _Family:
    """How one ``model_type`` maps onto a vision tower."""

    model_cls: type[PreTrainedModel]
    full: bool  # the config is a two-tower one: the tower's config is ``config.vision_config``
    num_prefix_tokens: int  # CLS tokens before the patches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str  # the family's image processor: CLIP crops (shortest_edge + center crop), SigLIP squashes


_HALF = (0.5, 0.5, 0.5)
_FAMILIES: dict[str, _Family] = {
    "clip": _Family(CLIPVisionModel, True, 1, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop"),
    "clip_vision_model": _Family(CLIPVisionModel, False, 1, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "crop"),
    "siglip": _Family(SiglipVisionModel, True, 0, _HALF, _HALF, "squash"),
    "siglip_vision_model": _Family(SiglipVisionModel, False, 0, _HALF, _HALF, "squash"),
}


def resolve_hidden_index(feature_layer: int, num_layers: int) -> int:
    """HF hidden-state index in [0, num_layers] for ``feature_layer`` (negative counts from the end)."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for a tower with {num_layers} blocks; valid: "
            f"{-(num_layers + 1)}..{num_layers} (0 = embeddings, -1 = last block, -2 = penultimate)")
    return feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer


def reject_toy_path(path: str, what: str) -> None:
    """Refuse ``toy://`` paths: ``lvlm.toy`` resolves them (``toy.resolve_config``) before any build."""
    if path.startswith("toy://"):
        raise ValueError(f"{what} {path!r} names an embedded toy asset; resolve the config with "
                         "lvlm.toy (toy.resolve_config) before building the vision encoder")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the unexpected-keys report when a vision tower is read from a two-tower checkpoint."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_config(name_or_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"vision checkpoint {name_or_path!r} not found: it is not a local directory with a "
            f"config.json and could not be read from the Hugging Face cache ({e})") from e


def _read_preprocessor(name_or_path: str) -> dict:
    """The checkpoint's preprocessor_config.json ({} when it has none)."""
    local = Path(name_or_path) / "preprocessor_config.json"
    path: str | None = str(local) if local.is_file() else None
    if path is None and not local.parent.is_dir():  # a hub id: look in the cache
        try:
            path = cached_file(name_or_path, "preprocessor_config.json",
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):  # no cache entry, no network: fall back to the family default
            path = None
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mean_std(pp: dict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if "image_mean" not in pp or "image_std" not in pp:
        return None
    return tuple(float(v) for v in pp["image_mean"]), tuple(float(v) for v in pp["image_std"])


def _resize_of(pp: dict) -> str | None:
    """The processor's way to a square: a centre crop -> crop; a fixed height x width without crop -> squash."""
    size = pp.get("size")
    if pp.get("do_center_crop"):
        return "crop"
    if isinstance(size, dict) and "height" in size and "width" in size and pp.get("do_resize", True):
        return "squash"
    return None


class HFVisionEncoder(VisionEncoder):
    """A CLIPVisionModel or SiglipVisionModel truncated after the block that ``feature_layer`` names.

    ``num_layers`` counts the blocks this encoder holds and runs (the checkpoint's blocks up to
    the feature layer); ``source_num_layers`` is the checkpoint's depth. ``feature_layer`` keeps
    its meaning relative to the checkpoint (-2 = the source's penultimate block).
    """

    def __init__(self, name_or_path: str, random_init: bool = False, feature_layer: int = -2,
                 keep_cls: bool = False, image_size: int | None = None, resize: str = "auto") -> None:
        super().__init__(feature_layer=feature_layer, keep_cls=keep_cls, resize=resize)
        if not name_or_path:
            raise ValueError("name_or_path is empty: give a local checkpoint directory or hub id")
        reject_toy_path(name_or_path, "name_or_path")
        config = _load_config(name_or_path)
        family = _FAMILIES.get(config.model_type)
        if family is None:
            raise ValueError(f"unsupported vision checkpoint model_type {config.model_type!r} in "
                             f"{name_or_path!r}; valid model_types: {', '.join(_FAMILIES)}")
        vision_config = config.vision_config if family.full else config
        self.source_num_layers = int(vision_config.num_hidden_layers)
        self._hidden_index = resolve_hidden_index(feature_layer, self.source_num_layers)
        if random_init:
            model = family.model_cls(vision_config)
        else:
            try:
                with _quiet_transformers():
                    model, info = family.model_cls.from_pretrained(
                        name_or_path, config=vision_config, dtype=torch.float32, output_loading_info=True)
            except OSError as e:
                raise FileNotFoundError(f"no vision weights found for {name_or_path!r} ({e}); pass "
                                        "random_init=True to build the tower untrained") from e
            if info["missing_keys"]:
                missing = sorted(info["missing_keys"])
                raise ValueError(f"checkpoint {name_or_path!r} lacks vision-tower weights, e.g. "
                                 f"{missing[:5]} ({len(missing)} missing); pass random_init=True to build "
                                 "it untrained")
        self._native_size = int(vision_config.image_size)
        preprocessor = _read_preprocessor(name_or_path)
        mean_std = _mean_std(preprocessor)
        mean, std = mean_std if mean_std is not None else (family.mean, family.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocessor_config.json of {name_or_path!r} has image_mean/image_std of "
                             f"length {len(mean)}/{len(std)}; expected 3 channels")

        core = getattr(model, "vision_model", model)  # transformers 4.x nests the tower, 5.x does not
        layers = core.encoder.layers
        self.set_contract(EncoderContract(
            embed_dim=int(vision_config.hidden_size), image_size=int(image_size or self._native_size),
            patch_size=int(vision_config.patch_size), num_prefix_tokens=family.num_prefix_tokens,
            mean=tuple(mean), std=tuple(std), layer_cls=type(layers[0]), num_layers=self._hidden_index,
            resize=_resize_of(preprocessor) or family.resize))
        # Run only the blocks the features need; the post-norm and pooling head are never used.
        core.encoder.layers = layers[: self._hidden_index]
        core.post_layernorm = nn.Identity()
        if hasattr(core, "head"):
            core.head = nn.Identity()
        self.model = model

    @classmethod
    def from_config(cls, cfg: HFVisionConfig) -> HFVisionEncoder:
        return cls(cfg.name_or_path, random_init=cfg.random_init, feature_layer=cfg.feature_layer,
                   keep_cls=cfg.keep_cls, image_size=cfg.image_size, resize=cfg.resize)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, S, S]
        size = pixel_values.shape[-1]
        out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=size != self._native_size)
        hidden = out.last_hidden_state  # [B, P + N, D], output of block `_hidden_index`
        if not self.keep_cls:
            hidden = hidden[:, self.num_prefix_tokens:]  # [B, N, D]
        return hidden
