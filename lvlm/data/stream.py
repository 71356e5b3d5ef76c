"""One source's infinite stream of sample refs: epochs, the seeded shuffle buffer, prefixed skip counts.

Owns the per-source half of the ordering contract (see ``lvlm.data.build``): epoch 0, 1, 2, ..., each the
source's deterministic order for ``(seed, epoch)`` passed through a shuffle buffer seeded by
``(seed, epoch[, tag])``. Every process computes the same stream; nothing here knows ranks or workers.
"""
from __future__ import annotations

import itertools
import random
from typing import Iterable, Iterator, TypeVar

from lvlm.data.skips import SkipCounter
from lvlm.data.sources import CaptionSource, SampleRef

T = TypeVar("T")


class EmptySourceError(RuntimeError):
    """A whole epoch of the source produced no valid sample (the loader would loop forever)."""


class PrefixedSkips(SkipCounter):
    """A view of a ``SkipCounter`` that files every reason under ``prefix/``."""

    def __init__(self, target: SkipCounter, prefix: str) -> None:
        super().__init__()
        self.target, self.prefix = target, prefix

    def add(self, reason: str, n: int = 1) -> None:
        self.target.add(f"{self.prefix}/{reason}", n)


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A streaming shuffle buffer of ``size`` items (0 or 1 = unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def global_stream(
    source: CaptionSource, *, seed: int, shuffle_buffer: int, skips: SkipCounter, tag: str = ""
) -> Iterator[SampleRef]:
    """The infinite stream of one source's sample refs (see the module docstring); ``tag`` (a mixture
    source name) gives each mixed source its own shuffle seed."""
    for epoch in itertools.count():
        rng = random.Random(f"lvlm.shuffle_buffer/{seed}/{epoch}" + (f"/{tag}" if tag else ""))
        count = 0
        for ref in shuffled(source.iter_refs(seed, epoch, skips), shuffle_buffer, rng):
            count += 1
            yield ref
        if count == 0:
            raise EmptySourceError(
                f"data source {source.name!r} yielded no valid sample in epoch {epoch}; "
                f"skipped so far: {skips.as_dict()}"
            )
