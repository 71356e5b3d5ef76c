"""Weighted mixing of named sources with exact ratios: a deterministic schedule, no sampling noise.

Owns the rule that decides which source supplies the next sample of the global stream. With
target shares p_i = w_i / sum(w) and c_i the amount (samples, or tokens) already taken from
source i, the next sample comes from the source with the largest deficit p_i * C - c_i, where
C = sum(c); ties go to the source listed first. In sample mode every sample counts 1, so after
any n samples |c_i - p_i n| < 1 and every window of n consecutive samples holds p_i n +- 2 of
source i: exact over a few hundred samples, not only in expectation. In token mode a sample
counts its token length, so token shares stay within one sample's length of the target.

The schedule uses no random numbers and depends only on the weights (and, in token mode, on the
lengths of the samples drawn), so every rank and worker computes the same global stream, which
``lvlm.data.build`` splits by index. Its position is the number of samples drawn, which the
checkpoint's data position already fixes; ``state_dict`` exposes the counts for logging and for
checking, on resume, that the replayed stream is the one that was checkpointed.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
MIX_UNITS = ("samples", "tokens")


class Mixture:
    """The exact-ratio schedule over named sources (see the module docstring)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], by: str = "samples") -> None:
        if by not in MIX_UNITS:
            raise ValueError(f"mixture unit {by!r} is not valid; choose one of {', '.join(MIX_UNITS)}")
        if not names or len(names) != len(weights):
            raise ValueError(f"a mixture needs one weight per source; got {len(names)} names, {len(weights)} weights")
        if len(set(names)) != len(names):
            raise ValueError(f"mixture source names must be unique, got {list(names)}")
        bad = [f"{n}={w!r}" for n, w in zip(names, weights) if not (isinstance(w, (int, float)) and w > 0
                                                                    and math.isfinite(w))]
        if bad:
            raise ValueError(f"mixture weights must be finite and > 0; bad: {', '.join(bad)}")
        total = float(sum(weights))
        self.names = list(names)
        self.shares = [w / total for w in weights]
        self.by = by
        self.amount = [0.0] * len(names)   # c_i: samples or tokens taken from each source
        self.samples = [0] * len(names)    # samples taken from each source (both modes)

    def next_source(self) -> int:
        """Index of the source that supplies the next sample (does not record it)."""
        taken = sum(self.amount)
        deficits = [p * taken - c for p, c in zip(self.shares, self.amount)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def record(self, index: int, length: int = 1) -> None:
        """Account one sample of ``length`` tokens (ignored in sample mode) taken from source ``index``."""
        self.amount[index] += 1 if self.by == "samples" else length
        self.samples[index] += 1

    def state_dict(self) -> dict:
        return {"by": self.by, "names": list(self.names), "samples": list(self.samples),
                "amount": list(self.amount)}


def mix(streams: Sequence[Iterator[T]], mixture: Mixture,
        length: Callable[[int, T], int] | None = None) -> Iterator[tuple[int, T]]:
    """Interleave ``streams`` (one infinite iterator per source, in mixture order) by the schedule.

    Yields ``(source index, item)``. In token mode ``length(source index, item)`` gives the item's
    token count; it is required then.
    """
    if len(streams) != len(mixture.names):
        raise ValueError(f"{len(streams)} streams for a mixture of {len(mixture.names)} sources")
    if mixture.by == "tokens" and length is None:
        raise ValueError("a token-weighted mixture needs the length of each sample")
    while True:
        i = mixture.next_source()
        item = next(streams[i])
        mixture.record(i, length(i, item) if length is not None and mixture.by == "tokens" else 1)
        yield i, item
