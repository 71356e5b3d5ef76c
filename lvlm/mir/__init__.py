"""MIR (Modality Integration Rate): public API.

Owns the layer loop: MIR = log10(sum_k FD_k) over the counted LLM layers (PAPERS.md section 1).
Assumes the caller has already chosen the counted layers (hidden_states 1..K, index 0 skipped)
and pooled each layer's vision rows [r, d] and text rows [s, d] over the probe set. The maths of
one layer lives in lvlm.mir.distance.

`LayerwiseMIR` streams: each `add_layer` computes that layer's FD at once, so a caller can feed
one layer at a time and drop it (peak memory = one layer). `compute_mir` is the one-shot form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from lvlm.mir.distance import (CROSS_MODES, ArrayLike, check_cross, frechet_distance, layer_distance,
                               preprocess)

__all__ = ["CROSS_MODES", "LayerwiseMIR", "MIRResult", "compute_mir", "frechet_distance",
           "layer_distance", "preprocess"]


@dataclass(frozen=True)
class MIRResult:
    """MIR over the counted layers. `mir` is -inf when the summed distance is <= 0."""

    mir: float
    per_layer: list[float] = field(default_factory=list)  # FD_k, one per counted layer, in order
    cross: str = "exact"
    num_vision_rows: int = 0
    num_text_rows: int = 0

    @property
    def total(self) -> float:
        """sum_k FD_k (MIR = log10 of this)."""
        return math.fsum(self.per_layer)


class LayerwiseMIR:
    """Streaming MIR accumulator: add layers one by one, then read `result()`."""

    def __init__(self, cross: str = "exact") -> None:
        self.cross = check_cross(cross)
        self._per_layer: list[float] = []
        self._rows: tuple[int, int] | None = None
        self._dim: int | None = None

    def __len__(self) -> int:
        return len(self._per_layer)

    def add_layer(self, vision_rows: ArrayLike, text_rows: ArrayLike) -> float:
        """Compute and record one layer's FD; vision_rows [r, d], text_rows [s, d]. Returns FD_k."""
        k = len(self._per_layer)
        shape_v = tuple(getattr(vision_rows, "shape", ()))
        shape_t = tuple(getattr(text_rows, "shape", ()))
        if len(shape_v) == 2 and len(shape_t) == 2:
            rows = (shape_v[0], shape_t[0])
            if self._rows is not None and rows != self._rows:
                raise ValueError(f"layer {k}: {rows[0]} vision / {rows[1]} text rows, but earlier "
                                 f"layers had {self._rows[0]} / {self._rows[1]}; every layer must pool "
                                 "the same tokens")
            if self._dim is not None and shape_v[1] != self._dim:
                raise ValueError(f"layer {k}: hidden dim {shape_v[1]} differs from earlier layers' "
                                 f"{self._dim}")
        try:
            fd = layer_distance(vision_rows, text_rows, self.cross)
        except ValueError as e:
            raise ValueError(f"layer {k}: {e}") from None
        self._rows = (shape_v[0], shape_t[0])
        self._dim = shape_v[1]
        self._per_layer.append(fd)
        return fd

    def result(self) -> MIRResult:
        """MIR = log10(sum_k FD_k) over the layers added so far."""
        if not self._per_layer:
            raise ValueError("no layers added: call add_layer(vision_rows, text_rows) at least once")
        total = math.fsum(self._per_layer)
        mir = math.log10(total) if total > 0.0 else float("-inf")
        assert self._rows is not None
        return MIRResult(mir=mir, per_layer=list(self._per_layer), cross=self.cross,
                         num_vision_rows=self._rows[0], num_text_rows=self._rows[1])


def compute_mir(vision: Sequence[ArrayLike], text: Sequence[ArrayLike], cross: str = "exact") -> MIRResult:
    """MIR from per-layer rows: vision[k] [r, d] and text[k] [s, d] for each counted layer k."""
    check_cross(cross)
    if len(vision) != len(text):
        raise ValueError(f"layer count mismatch: {len(vision)} vision layers vs {len(text)} text layers; "
                         "pass one entry per counted layer in both")
    if len(vision) == 0:
        raise ValueError("no layers given: vision and text must each hold one [rows, dim] entry per layer")
    acc = LayerwiseMIR(cross)
    for v, t in zip(vision, text):
        acc.add_layer(v, t)
    return acc.result()
