"""Loading and dumping configs: YAML file + dotted CLI overrides -> ``Config`` (values checked by
``validate.py``).

Every user error becomes a ``ConfigError`` that names the bad key or value and lists the
valid choices, raised before any model, data or process group is touched.
"""
from __future__ import annotations

import dataclasses
import io
import re
import tempfile
from pathlib import Path
from typing import Sequence

import draccus
import yaml

from lvlm.config.schema import Config, ConnectorConfig, MixtureComponent, SourceConfig, VisionConfig
from lvlm.config.validate import ConfigError, validate


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
    cfg.resume = str(cfg.resume).lower()  # `--resume false` parses as 'False'; config.yaml keeps one spelling
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


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable again with ``load_config``)."""
    buf = io.StringIO()
    draccus.dump(cfg, buf)
    return buf.getvalue()
