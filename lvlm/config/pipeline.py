"""Multi-stage pipelines: one YAML whose stages each start from the previous stage's weights.

Format::

    run_dir: runs/llava15              # stage NAME runs in RUN_DIR/NAME (a normal run directory)
    base: stage1_pretrain.yaml         # optional: a complete config every stage starts from (path relative
                                       #   to this file)
    optim: {weight_decay: 0.0}         # optional: any config keys, shared by every stage (on top of base)
    stages:                            # ordered: name -> that stage's keys (nested mappings)
      align: {}
      sft:
        stage: {train_llm: true}
        data: {source: {type: llava_json, format: chat, json_path: ..., image_folder: ...}}

Layers are merged key by key (base <- shared keys <- stage keys <- command line), except that a mapping
with a ``type`` key (a choice: ``model.vision``, ``model.connector``, ``data.source``, a mixture
component's ``source``) and ``data.mixture`` replace what they override as a whole: a different
source is a different thing, not a patch of the old one. Each stage's ``stage.name`` is its key and
its ``stage.init_from`` defaults to the previous stage's run directory. On the command line
``--key value`` applies to every stage and ``--stages.NAME.key value`` to one; ``--run_dir`` moves the
pipeline. Every stage's config is loaded and validated before any stage runs.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from lvlm.config.load import ConfigError, load_config
from lvlm.config.schema import Config

_REPLACED_WHOLE = {("data", "mixture")}


@dataclass
class Pipeline:
    run_dir: Path
    stages: list[tuple[str, Config]]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e


def is_pipeline(path: str | Path | None) -> bool:
    """A YAML file whose top level has ``stages``."""
    if not path or not Path(path).is_file():
        return False
    data = _read_yaml(Path(path))
    return isinstance(data, dict) and "stages" in data


def merge(base: dict, over: dict, where: tuple[str, ...] = ()) -> dict:
    """``over`` on top of ``base`` (see the module docstring for what is replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        path = (*where, str(key))
        if (isinstance(value, dict) and isinstance(out.get(key), dict) and "type" not in value
                and path not in _REPLACED_WHOLE):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _split_overrides(args: Sequence[str], names: list[str]) -> tuple[list[str], dict[str, list[str]], str | None]:
    """(every-stage args, per-stage args, --run_dir value) from ``--key value`` / ``--key=value`` args."""
    common: list[str] = []
    per: dict[str, list[str]] = {n: [] for n in names}
    run_dir = None
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if eq:
            pair, i = [key, value], i + 1
        else:
            pair = [arg] + ([args[i + 1]] if i + 1 < len(args) else [])
            i += len(pair)
        if not pair[0].startswith("--") or len(pair) < 2:
            raise ConfigError(f"expected --key value pairs after the pipeline file, got {arg!r}")
        if pair[0] == "--run_dir":
            run_dir = pair[1]
        elif pair[0].startswith("--stages."):
            _, name, rest = pair[0][2:].split(".", 2) if pair[0].count(".") >= 2 else (None, "", "")
            if name not in per or not rest:
                raise ConfigError(f"{pair[0]}: no stage {name!r} in this pipeline; stages: {', '.join(names)} "
                                  "(form: --stages.NAME.dotted.key value)")
            per[name] += [f"--{rest}", pair[1]]
        else:
            common += pair
    return common, per, run_dir


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    """Every stage's validated ``Config``, in order."""
    path = Path(path)
    raw = _read_yaml(path)
    stages = raw.pop("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty mapping name -> settings")
    shared: dict = {}
    if "base" in raw:
        base_path = (path.parent / str(raw.pop("base"))).resolve()
        shared = _read_yaml(base_path) or {}
        if not isinstance(shared, dict) or "stages" in shared:
            raise ConfigError(f"{path}: base {base_path} must be a single-run config (a mapping without 'stages')")
    shared = merge(shared, raw)
    names = [str(n) for n in stages]
    common, per, run_dir = _split_overrides(list(overrides), names)
    root = Path(run_dir or shared.get("run_dir") or f"runs/{path.stem}")
    out: list[tuple[str, Config]] = []
    previous: Path | None = None
    for name in names:
        keys = stages[name] or {}
        if not isinstance(keys, dict):
            raise ConfigError(f"{path}: stage {name!r} must map to settings (a mapping), got {type(keys).__name__}")
        data = merge(shared, keys)
        data["run_dir"] = str(root / name)
        stage = data.setdefault("stage", {})
        stage["name"] = name
        if previous is not None and not (keys.get("stage") or {}).get("init_from"):
            stage["init_from"] = str(previous)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(data, f, sort_keys=False)
        try:
            cfg = load_config(f.name, [*common, *per[name]])
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {name!r}: {e}") from e
        finally:
            Path(f.name).unlink(missing_ok=True)
        out.append((name, cfg))
        previous = root / name
    return Pipeline(root, out)
