"""Value checks of a loaded ``Config`` that types alone cannot make, and ``ConfigError``.

Owns ``validate``: every range, choice and no-effect combination checkable without building a model or
reading data, each refused with a ``ConfigError`` naming the key, the value and the valid choices.
Imports nothing heavy (no torch), like the rest of ``lvlm.config``.
"""
from __future__ import annotations

import importlib.util
import math
import re

from lvlm.config.schema import (
    IMAGE_POSITIONS,
    INTERLEAVED_FORMATS,
    LLAVA_FORMATS,
    TEXT_FORMATS,
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    Config,
    ConnectorConfig,
    InterleavedSourceConfig,
    LLaVAJsonSourceConfig,
    LoRAConfig,
    MLPConnectorConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    SourceConfig,
    TextSourceConfig,
    TokenMergeConnectorConfig,
)


class ConfigError(ValueError):
    """A configuration the framework refuses, with the reason and the valid choices."""


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for {name}; valid choices: {', '.join(map(str, choices))}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


def _check_source(where: str, src: SourceConfig) -> None:
    """Choices and ranges of one data source (data.source, data.mixture.NAME.source, mir.images, mir.texts),
    and its keys that the chosen format would ignore."""
    if isinstance(src, LLaVAJsonSourceConfig):
        _one_of(f"{where}.format", src.format, LLAVA_FORMATS)
    if isinstance(src, InterleavedSourceConfig):
        _one_of(f"{where}.format", src.format, INTERLEAVED_FORMATS)
        _one_of(f"{where}.image_position", src.image_position, IMAGE_POSITIONS)
        _positive(f"{where}.max_images", src.max_images, allow_zero=True)
        if src.format != "mmc4" and src.image_position != "before":
            raise ConfigError(f"{where}.image_position {src.image_position!r} applies to format mmc4 only (its images "
                              f"are matched to sentences); {where}.format is {src.format!r}: it would have no effect")
        if src.format == "webdataset" and src.image_folder:
            raise ConfigError(f"{where}.image_folder is set but {where}.format is 'webdataset' (images are members "
                              "of the shards): it would have no effect; it is for mmc4 / obelics documents")
    if isinstance(src, TextSourceConfig):
        _one_of(f"{where}.format", src.format, TEXT_FORMATS)
        if src.format == "webdataset" and src.field != "text":
            raise ConfigError(f"{where}.field {src.field!r} is set but {where}.format is 'webdataset' (the text is "
                              "always the KEY.txt member): it would have no effect; it is for jsonl / parquet")


def _check_sources(cfg: Config) -> None:
    d = cfg.data
    if not d.mixture and d.mix_by != "samples":
        raise ConfigError(f"data.mix_by is {d.mix_by!r} but there is no data.mixture: one source has nothing to mix "
                          "by; it would have no effect")
    sources = {f"data.mixture.{n}.source": c.source for n, c in d.mixture.items()} or {"data.source": d.source}
    for where, src in {**sources, "mir.images": cfg.mir.images, "mir.texts": cfg.mir.texts}.items():
        _check_source(where, src)


def _check_connector(c: ConnectorConfig) -> None:
    """Connector values checkable without the encoder (the patch grid and vision width come at build time)."""
    if isinstance(c, (MLPConnectorConfig, AvgPoolConnectorConfig, TokenMergeConnectorConfig)):
        _positive("model.connector.depth", c.depth)
        _one_of("model.connector.activation", c.activation, ("gelu", "relu", "silu", "tanh"))
    if isinstance(c, (AvgPoolConnectorConfig, CAbstractorConnectorConfig)):
        side = int(round(max(c.tokens, 0) ** 0.5))
        if c.tokens < 1 or side * side != c.tokens:
            raise ConfigError(f"model.connector.tokens must be a perfect square > 0 for model.connector.type "
                              f"{ConnectorConfig.get_choice_name(type(c))} (e.g. 16, 36, 64, 144, 256), got {c.tokens}")
    if isinstance(c, TokenMergeConnectorConfig):
        _positive("model.connector.kernel", c.kernel)
    if isinstance(c, CAbstractorConnectorConfig):
        _positive("model.connector.num_blocks", c.num_blocks)
        _positive("model.connector.hidden_size", c.hidden_size, allow_zero=True)
    if isinstance(c, QFormerConnectorConfig):
        _positive("model.connector.cross_attention_every", c.cross_attention_every)
    if isinstance(c, (ResamplerConnectorConfig, QFormerConnectorConfig)):
        _positive("model.connector.tokens", c.tokens)
        _positive("model.connector.layers", c.layers)
        _positive("model.connector.heads", c.heads)
        _positive("model.connector.hidden_size", c.hidden_size, allow_zero=isinstance(c, ResamplerConnectorConfig))
        if c.hidden_size and c.hidden_size % c.heads:
            divisors = [d for d in range(1, c.hidden_size + 1) if c.hidden_size % d == 0]
            raise ConfigError(f"model.connector.heads {c.heads} does not divide model.connector.hidden_size "
                              f"{c.hidden_size}; valid heads: {', '.join(map(str, divisors))}")


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot; raise ``ConfigError`` naming the key and choices."""
    llm = cfg.model.llm
    _one_of("model.llm.dtype", llm.dtype, ("float32", "bfloat16", "float16"))
    _one_of("model.llm.attn_implementation", llm.attn_implementation, ("eager", "sdpa", "flash_attention_2"))
    if not llm.name_or_path:
        raise ConfigError("model.llm.name_or_path is empty: give a local directory or hub id")
    if not (llm.image_token or "").strip():
        raise ConfigError("model.llm.image_token is empty: give the placeholder string of an image "
                          "(default <image>; it must not be a word of the LLM's vocabulary)")
    vision = cfg.model.vision
    _one_of("model.vision.resize", vision.resize, ("auto", "crop", "squash", "pad"))
    if getattr(vision, "name_or_path", None) == "":
        raise ConfigError("model.vision.name_or_path is empty: give a local directory or hub id")
    if getattr(vision, "arch", None) == "":
        raise ConfigError("model.vision.arch is empty: give an open_clip architecture or model-config JSON")
    if vision.image_size is not None:
        _positive("model.vision.image_size", vision.image_size)
    _check_connector(cfg.model.connector)
    _check_sources(cfg)
    _positive("data.max_length", cfg.data.max_length)
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    _positive("data.shuffle_buffer", cfg.data.shuffle_buffer, allow_zero=True)
    o = cfg.optim
    _positive("optim.lr", o.lr)
    _one_of("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.schedule == "constant" and o.min_lr_ratio:
        raise ConfigError(f"optim.min_lr_ratio is {o.min_lr_ratio} but optim.schedule is 'constant' (no decay): "
                          "it would have no effect; set it to 0 or choose cosine / linear")
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    for name, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {beta}")
    if not 0.0 < o.eps < float("inf"):
        raise ConfigError(f"optim.eps must be a finite number > 0, got {o.eps}")
    if not 0.0 <= o.weight_decay < float("inf"):
        raise ConfigError(f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}")
    t = cfg.train
    _positive("train.max_steps", t.max_steps)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _positive("train.save_every", t.save_every, allow_zero=True)
    _positive("train.keep_last", t.keep_last)
    _positive("train.log_every", t.log_every)
    _one_of("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
    _one_of("train.precision", t.precision, ("fp32", "bf16"))
    _one_of("mir.cross", cfg.mir.cross, ("exact", "paper-fast"))
    _positive("mir.every", cfg.mir.every, allow_zero=True)
    _positive("mir.batch_size", cfg.mir.batch_size)
    _positive("mir.max_length", cfg.mir.max_length)
    _one_of("resume", str(cfg.resume).lower(), ("auto", "true", "false", "force"))
    _one_of("track.wandb_mode", cfg.track.wandb_mode, ("online", "offline", "disabled"))
    if cfg.track.wandb and not cfg.track.wandb_project:
        raise ConfigError("track.wandb is true but track.wandb_project is empty; name a project "
                          "(--track.wandb_project NAME)")
    for flag, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg.track, flag) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"track.{flag} is true but the {module} package is not installed; "
                              "pip install 'lvlm[tracking]'")
    _one_of("data.mix_by", cfg.data.mix_by, ("samples", "tokens"))
    if not 0.0 < cfg.data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must be in (0, 1] (1 = never fail), "
                          f"got {cfg.data.max_skip_fraction}")
    for name, comp in cfg.data.mixture.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"mixture source name {name!r} must be letters, digits, '_' or '-'")
        if not (comp.weight >= 0 and comp.weight != float("inf")):
            raise ConfigError(f"data.mixture.{name}.weight must be a finite number >= 0 (0 = left out), "
                              f"got {comp.weight}")
    if cfg.data.mixture and not any(c.weight > 0 for c in cfg.data.mixture.values()):
        raise ConfigError("every data.mixture weight is 0: nothing to read; give at least one source a weight > 0")
    _positive("mir.layers_per_pass", cfg.mir.layers_per_pass, allow_zero=True)
    if not cfg.mir.memory_gb > 0:
        raise ConfigError(f"mir.memory_gb must be > 0 (GiB for pooled probe rows), got {cfg.mir.memory_gb}")
    if cfg.mir.num_samples < 1:
        raise ConfigError(f"mir.num_samples must be >= 1 (probe images), got {cfg.mir.num_samples}")
    if not cfg.mir.system_prompt.strip():
        raise ConfigError("mir.system_prompt is empty: the LLaVA v1 probe format always has a system text "
                          "(an empty one would silently be LLaVA's); give one or leave the default")
    _check_stage(cfg)
    return cfg


def _check_stage(cfg: Config) -> None:
    s = cfg.stage
    if not (s.train_vision or s.train_connector or s.train_llm or (s.train_moca and cfg.model.moca)):
        raise ConfigError("stage trains nothing: set at least one of stage.train_vision/train_connector/train_llm")
    _positive("stage.vision_from_layer", s.vision_from_layer, allow_zero=True)
    _positive("stage.llm_up_to_layer", s.llm_up_to_layer, allow_zero=True)
    if s.vision_from_layer and not s.train_vision:
        raise ConfigError("stage.vision_from_layer is set but stage.train_vision is false: it would have no effect")
    if s.llm_up_to_layer and not s.train_llm:
        raise ConfigError("stage.llm_up_to_layer is set but stage.train_llm is false: it would have no effect")
    if s.train_moca and not cfg.model.moca:
        raise ConfigError("stage.train_moca is true but model.moca is false: there is no MoCa to train")
    lc = s.lora
    _positive("stage.lora.r", lc.r, allow_zero=True)
    if not lc.r:
        unused = [f"stage.lora.{k}" for k in ("alpha", "dropout", "target_modules", "save")
                  if getattr(lc, k) != getattr(LoRAConfig(), k)]
        if unused:
            raise ConfigError(f"{', '.join(unused)} set but stage.lora.r is 0 (no LoRA): it would have no effect; "
                              "set stage.lora.r > 0 (with stage.train_llm) or drop them")
    if lc.r and not s.train_llm:
        raise ConfigError(f"stage.lora.r is {lc.r} but stage.train_llm is false: LoRA trains the LLM; set "
                          "stage.train_llm true or stage.lora.r 0")
    if lc.r:
        if not lc.alpha > 0:
            raise ConfigError(f"stage.lora.alpha must be > 0, got {lc.alpha}")
        if not 0.0 <= lc.dropout < 1.0:
            raise ConfigError(f"stage.lora.dropout must be in [0, 1), got {lc.dropout}")
        if not lc.target_modules:
            raise ConfigError("stage.lora.target_modules is empty: name the LLM's linear layers to adapt")
    _one_of("stage.lora.save", lc.save, ("merged", "adapter"))
    for part in ("vision", "connector", "llm", "moca"):
        value = getattr(s.lr, part)
        if not (value >= 0 and value != float("inf")):
            raise ConfigError(f"stage.lr.{part} must be a finite number >= 0 (0 = optim.lr), got {value}")
    _check_stage_lr(cfg)


def _check_stage_lr(cfg: Config) -> None:
    """A per-part learning rate for a part this stage does not train would have no effect: refused, like
    stage.vision_from_layer without stage.train_vision."""
    s = cfg.stage
    trains = {"vision": ("stage.train_vision", s.train_vision), "connector": ("stage.train_connector",
              s.train_connector), "llm": ("stage.train_llm", s.train_llm)}
    for part, (flag, on) in trains.items():
        if getattr(s.lr, part) and not on:
            raise ConfigError(f"stage.lr.{part} is set ({getattr(s.lr, part)}) but {flag} is false: it would have "
                              "no effect")
    if s.lr.moca and not cfg.model.moca:
        raise ConfigError(f"stage.lr.moca is set ({s.lr.moca}) but model.moca is false: there is no MoCa to train")
    train_moca = s.train_connector if s.train_moca is None else s.train_moca
    if s.lr.moca and not train_moca:
        raise ConfigError(f"stage.lr.moca is set ({s.lr.moca}) but MoCa does not train (stage.train_moca is "
                          f"{s.train_moca}, stage.train_connector is {s.train_connector}): it would have no effect")
