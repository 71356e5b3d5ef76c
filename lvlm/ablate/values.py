"""How grid values become command-line arguments and cell-name labels.

``format_value``/``to_args``: ``{optim.lr: 0.001, stage.train_llm: true}`` -> ``--optim.lr 0.001
--stage.train_llm true``. ``label``: the compact form in cell names (``1e-3``, ``0.03``, ``true``);
``safe``: filesystem-safe names; ``short_names``: the shortest unique tail of each axis key;
``number``: YAML-1.2 reading of ``5e-4``; ``flatten``: nested mappings to dotted keys.
"""
from __future__ import annotations

import math
import re
from typing import Any

import yaml

from lvlm.config.dotted import flatten as dotted


def format_value(v: Any) -> str:
    """A value as a command-line string (`true`, `0.001`, `[1, 2]`)."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (int, float, str)):
        return str(v) if not isinstance(v, float) else repr(v)
    return yaml.safe_dump(v, default_flow_style=True).strip()


def to_args(settings: dict[str, Any]) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k}", format_value(v))]


def label(v: Any) -> str:
    """A value as it appears in a cell name: floats compact (1e-3, 0.03), booleans lower case."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        if 1e-2 <= abs(v) < 1e4:
            return f"{v:g}"
        exp = math.floor(math.log10(abs(v)))
        mant = f"{v / 10 ** exp:g}"
        if mant in ("10", "-10"):
            mant, exp = mant[:-1], exp + 1
        return f"{mant}e{exp}"
    if isinstance(v, (list, tuple)):
        return "-".join(label(x) for x in v)
    return str(v)


def safe(s: str) -> str:
    """Filesystem-safe: letters, digits and ``._+-=`` survive, anything else becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", s).strip("-.") or "_"


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def number(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``5e-4`` as a string; read it as the float YAML 1.2 and users mean."""
    return float(v) if isinstance(v, str) and _SCI.match(v) else v


def flatten(d: dict) -> dict[str, Any]:
    """Dotted keys (``lvlm.config.dotted.flatten``) with YAML-1.2 numbers."""
    return {key: number(value) for key, value in dotted(d).items()}


def short_names(keys: list[str]) -> list[str]:
    """Shortest tail of each dotted key that is unique among the keys (lr, align.optim.lr, ...)."""
    parts = [k.split(".") for k in keys]
    n = [1] * len(keys)
    while True:
        shorts = [".".join(p[-m:]) for p, m in zip(parts, n)]
        dup = {s for s in shorts if shorts.count(s) > 1}
        if not dup:
            return shorts
        grown = False
        for i, s in enumerate(shorts):
            if s in dup and n[i] < len(parts[i]):
                n[i] += 1
                grown = True
        if not grown:
            raise ValueError(f"axes {keys} cannot be told apart by name")
