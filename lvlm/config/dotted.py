"""Nested mappings as dotted keys (``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``), the form config
overrides, run-dir comparisons and ablation axes use. Imports nothing heavy."""
from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf}; an empty mapping is a leaf (kept as ``{}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
