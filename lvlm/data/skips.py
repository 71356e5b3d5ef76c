"""Counting samples that were skipped, by reason.

Owns ``SkipCounter``: every stage that drops a sample instead of crashing (a source finding a
member without a caption, the tokenizer finding no supervised tokens left, collate failing to
decode an image) calls ``add(reason)``. Reasons are short snake_case strings; the counter knows
no fixed list. One counter lives per data-loading process (one per worker), never at module level.
"""
from __future__ import annotations

from collections import Counter


class SkipCounter:
    """Cumulative counts of skipped samples (or shards) keyed by reason."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        if not reason or not isinstance(reason, str):
            raise ValueError(f"skip reason must be a non-empty string, got {reason!r}")
        if n < 0:
            raise ValueError(f"skip count must be >= 0, got {n} for reason {reason!r}")
        if n:
            self._counts[reason] += n

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """A snapshot (a plain dict, sorted by reason) that later ``add`` calls do not change."""
        return dict(sorted(self._counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


# Reasons detected after the rank/worker split: each sample is seen by exactly one reader, so counts add
# up across readers. Every other reason is detected while reading the shared stream, which every reader
# (each worker of each rank) walks in full, so each reader counts every such skip and the max is the truth.
PARTITIONED_REASONS = frozenset({"image_exceeds_max_length", "no_supervised_tokens", "corrupt_image",
                                 "unreadable_image", "bad_conversation"})
# Reasons that count dropped parts of a sample that is still used (an image past max_images, an absent image
# file of an mmc4/obelics document): reported, but not skipped samples, so they never count towards
# data.max_skip_fraction.
PART_REASONS = frozenset({"images_over_limit", "images_missing"})


def merge_skip_counts(per_reader: list[dict[str, int]]) -> dict[str, int]:
    """Combine the cumulative counts of several readers (workers x ranks) into run totals."""
    merged: dict[str, int] = {}
    for counts in per_reader:
        for reason, n in counts.items():
            if reason.rsplit("/", 1)[-1] in PARTITIONED_REASONS:  # mixtures file reasons as "source/reason"
                merged[reason] = merged.get(reason, 0) + n
            else:
                merged[reason] = max(merged.get(reason, 0), n)
    return dict(sorted(merged.items()))
