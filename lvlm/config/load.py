"""Loading, validating and dumping configs: YAML file + dotted CLI overrides -> ``Config``.

Every user error becomes a ``ConfigError`` that names the bad key or value and lists the
valid choices, raised before any model, data or process group is touched.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
import tempfile
from pathlib import Path
from typing import Sequence

import draccus
import yaml

from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    Config,
    ConnectorConfig,
    MixtureComponent,
    MLPConnectorConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
    SourceConfig,
    VisionConfig,
)


class ConfigError(ValueError):
    """A configuration the framework refuses, with the reason and the valid choices."""


_CHOICE_CLASSES = {"model.vision": VisionConfig, "model.connector": ConnectorConfig, "data.source": SourceConfig,
                   "mir.images": SourceConfig, "mir.texts": SourceConfig}
# A plain string where these sources are expected is their original (and shortest) form: the probe images as
# webdataset shards, the probe texts as a jsonl file with a `text` field.
_STRING_SOURCES = {"mir.images": ("webdataset", "shards"), "mir.texts": ("text", "files")}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _explain(err: Exception) -> str:
    """Turn a draccus decoding error into a message that lists what is valid."""
    msg = str(err)
    m = re.match(r"`([\w.]*)`: The fields `(.*)` are not valid for (\w+)", msg)
    if m:
        path, bad, cls_name = m.groups()
        cls = _resolve_class(path, cls_name)
        valid = ", ".join(_field_names(cls)) if cls else "?"
        return _unknown_keys(bad, path, valid)
    for path, registry in _CHOICE_CLASSES.items():
        if (path in msg or f".{registry.__name__}'" in msg) and ("type" in msg or "choice" in msg.lower()):
            return f"{msg}; valid '{path}.type' choices: {', '.join(sorted(registry.get_known_choices()))}"
    return msg


def _unknown_keys(bad: str, path: str, valid: str) -> str:
    """The message for keys that are not in the schema (a YAML file's and the command line's alike)."""
    return f"unknown key(s) {bad} under '{path or '<top level>'}'; valid keys: {valid}"


def _schema_keys(cls, path: str) -> dict[str, type | None]:
    """The keys allowed under ``path`` (of dataclass ``cls``): name -> the dataclass below it, or None for a
    value. Under a choice (``_CHOICE_CLASSES``): ``type`` and the fields of every registered choice."""
    if path in _CHOICE_CLASSES:
        keys: dict[str, type | None] = {"type": None}
        for choice in cls.get_known_choices().values():
            keys.update({name: None for name in _field_names(choice) if name not in keys})
        return keys
    keys = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        child = _CHOICE_CLASSES.get(sub)
        if child is None and f.default_factory is not dataclasses.MISSING:
            made = type(f.default_factory())
            child = made if dataclasses.is_dataclass(made) else None
        keys[f.name] = child
    return keys


def _check_override_keys(overrides: Sequence[str]) -> None:
    """``--dotted.key`` overrides that name no key of the schema get the YAML path's message (what is unknown,
    where, the valid keys) instead of argparse's usage dump. Runs after the mixture and string-source rewrites."""
    for a in overrides:
        if not a.startswith("--"):
            continue
        flag = a.split("=", 1)[0]
        parts, cls, path = flag[2:].split("."), Config, ""
        for i, part in enumerate(parts):
            keys = _schema_keys(cls, path)
            if part not in keys:
                raise ConfigError(f"{_unknown_keys(part, path, ', '.join(keys))} (command line: {flag})")
            path, cls = f"{path}.{part}" if path else part, keys[part]
            if cls is None:
                if i + 1 < len(parts) and path not in _CHOICE_CLASSES:
                    raise ConfigError(f"unknown key(s) {parts[i + 1]} under '{path}': {path} is a value, it has "
                                      f"no keys (command line: {flag})")
                break


def _resolve_class(path: str, cls_name: str):
    for registry in _CHOICE_CLASSES.values():
        for cls in registry.get_known_choices().values():
            if cls.__name__ == cls_name:
                return cls
    if cls_name == MixtureComponent.__name__:
        return MixtureComponent
    cls = Config
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(cls):
            return None
        types = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        factory = types.get(part)
        if factory is None or factory is dataclasses.MISSING:
            return None
        cls = type(factory())
    return cls if cls.__name__ == cls_name else None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Parse an optional YAML file plus ``--dotted.key value`` overrides, then validate."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    _check_choice_overrides(overrides)
    given = path
    path, overrides = _apply_mixture_overrides(path, overrides)
    path, overrides = _apply_string_sources(path, overrides, given)
    path = _apply_type_switches(path, overrides, given)
    try:
        _check_override_keys(overrides)
        args = _with_choice_types(path, list(overrides))
        cfg = draccus.parse(Config, config_path=str(path) if path else None, args=args)
    except ConfigError:
        raise
    except SystemExit as e:  # argparse exits on unknown CLI flags
        raise ConfigError(f"bad command-line override(s) {' '.join(overrides)}: see `lvlm train --help`") from e
    except Exception as e:  # draccus.utils.DecodingError and friends
        raise ConfigError(_explain(e)) from e
    finally:
        if path is not None and path != given:  # the temporary YAML holding mixture overrides
            Path(path).unlink(missing_ok=True)
    validate(cfg)
    return cfg


MIXTURE_PREFIX = "--data.mixture."


def _apply_mixture_overrides(path, overrides: Sequence[str]) -> tuple[str | Path | None, list[str]]:
    """``--data.mixture.NAME.KEY value`` overrides (draccus cannot address dict entries) are applied to
    the YAML's ``data.mixture`` mapping, written to a temporary file; other overrides pass through."""
    args, rest, edits = list(overrides), [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith(MIXTURE_PREFIX):
            key, value = (a.split("=", 1) if "=" in a else (a, args[i + 1] if i + 1 < len(args) else None))
            i += 1 if "=" in a else 2
            parts = key[len(MIXTURE_PREFIX):].split(".")
            if value is None or len(parts) < 2 or not all(parts):
                raise ConfigError(f"bad mixture override {a!r}: use --data.mixture.NAME.KEY VALUE, e.g. "
                                  "--data.mixture.captions.weight 0.45 or --data.mixture.captions.source.shards PATH")
            edits.append((parts, yaml.safe_load(value)))
        else:
            rest.append(a)
            i += 1
    if not edits:
        return path, rest
    doc = yaml.safe_load(Path(path).read_text()) if path is not None else {}
    doc = doc or {}
    for parts, value in edits:
        node = doc.setdefault("data", {}).setdefault("mixture", {})
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"mixture override --data.mixture.{'.'.join(parts)}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return _edited(doc, path, path), rest


def _edited(doc: dict, path, given) -> str:
    """Where the edited config ``doc`` now lives: ``path`` rewritten in place when it is already a temporary
    file of ours (``path != given``), else a new temporary YAML (load_config deletes it afterwards). Key order
    is kept (mixture order breaks schedule ties)."""
    if path is not None and path != given:
        Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
        return str(path)
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lvlm-config-", delete=False)
    with tmp:
        yaml.safe_dump(doc, tmp, sort_keys=False)
    return tmp.name


def _apply_string_sources(path, overrides: Sequence[str], given) -> tuple[str | Path | None, list[str]]:
    """``mir.images: PATH`` / ``--mir.images PATH`` (and ``mir.texts``), the string form, become the source
    they stand for (``_STRING_SOURCES``): ``{type: webdataset, shards: PATH}`` / ``{type: text, files: PATH}``
    in the YAML (rewritten to a temporary file when needed) and ``--mir.images.type webdataset
    --mir.images.shards PATH`` on the command line. Any other form passes through unchanged."""
    args, out = list(overrides), []
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if key in _STRING_SOURCES:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            kind, attr = _STRING_SOURCES[key]
            out += [f"--{key}.type", kind, f"--{key}.{attr}", value]
        else:
            out.append(a)
        i += 1
    if path is None:
        return path, out
    doc = yaml.safe_load(Path(path).read_text()) or {}
    mir = doc.get("mir") if isinstance(doc, dict) else None
    strings = {k: mir[k.split(".")[1]] for k in _STRING_SOURCES
               if isinstance(mir, dict) and isinstance(mir.get(k.split(".")[1]), str)}
    if not strings:
        return path, out
    for key, value in strings.items():
        kind, attr = _STRING_SOURCES[key]
        mir[key.split(".")[1]] = {"type": kind, attr: value}
    return _edited(doc, path, given), out


def _apply_type_switches(path, overrides: Sequence[str], given) -> str | Path | None:
    """``--model.connector.type qformer`` over a YAML that sets an ``mlp`` connector's fields: the YAML's
    node for that choice is replaced by ``{type: qformer}`` (the old type's fields would be unknown keys),
    so a command line or an ablation cell can switch any choice. Writes a temporary YAML when needed."""
    if path is None:
        return path
    args = list(overrides)
    switches = {}
    for i, a in enumerate(args):
        key, _, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if not value and i + 1 < len(args):
            value = args[i + 1]
        for choice in _CHOICE_CLASSES:
            if key == f"{choice}.type":
                switches[choice] = value
    if not switches:
        return path
    doc = yaml.safe_load(Path(path).read_text()) or {}
    changed = False
    for choice, new_type in switches.items():
        *parents, leaf = choice.split(".")
        node = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), dict):
            continue
        current = node[leaf].get("type") or _default_choice(choice)
        if current != new_type:
            node[leaf] = {"type": new_type}
            changed = True
    if not changed:
        return path
    return _edited(doc, path, given)


def _default_choice(choice: str) -> str:
    obj = Config()
    for part in choice.split("."):
        obj = getattr(obj, part)
    return obj.get_choice_name(type(obj))


def _check_choice_overrides(overrides: Sequence[str]) -> None:
    """Give invalid ``--x.type`` choices and unknown flags our message rather than argparse's."""
    args = list(overrides)
    for i, a in enumerate(args):
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key is None:
            continue
        value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
        for path, registry in _CHOICE_CLASSES.items():
            if key == f"{path}.type" and value not in registry.get_known_choices():
                valid = ", ".join(sorted(registry.get_known_choices()))
                raise ConfigError(f"invalid choice '{value}' for {key}; valid choices: {valid}")


def _with_choice_types(path, args: list[str]) -> list[str]:
    """draccus needs ``--x.type`` whenever a field of choice ``x`` is overridden: supply the current one."""
    touched = [p for p in _CHOICE_CLASSES if any(a.startswith(f"--{p}.") for a in args)]
    missing = [p for p in touched if not any(a.split("=")[0] == f"--{p}.type" for a in args)]
    if not missing:
        return args
    base = draccus.parse(Config, config_path=str(path) if path else None, args=[])
    for p in missing:
        obj = base
        for part in p.split("."):
            obj = getattr(obj, part)
        args = [f"--{p}.type", obj.get_choice_name(type(obj)), *args]
    return args


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for {name}; valid choices: {', '.join(map(str, choices))}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


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
    vision = cfg.model.vision
    _one_of("model.vision.resize", vision.resize, ("auto", "crop", "squash", "pad"))
    if getattr(vision, "name_or_path", None) == "":
        raise ConfigError("model.vision.name_or_path is empty: give a local directory or hub id")
    if getattr(vision, "arch", None) == "":
        raise ConfigError("model.vision.arch is empty: give an open_clip architecture or model-config JSON")
    if vision.image_size is not None:
        _positive("model.vision.image_size", vision.image_size)
    _check_connector(cfg.model.connector)
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
    if cfg.mir.num_samples < 2:
        raise ConfigError(f"mir.num_samples must be >= 2 (covariances need two rows), got {cfg.mir.num_samples}")
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


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable again with ``load_config``)."""
    buf = io.StringIO()
    draccus.dump(cfg, buf)
    return buf.getvalue()
