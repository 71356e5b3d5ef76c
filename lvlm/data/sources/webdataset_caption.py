"""Caption pairs from webdataset shards in the img2dataset layout.

Owns reading tar shards whose members are ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``) next to
``KEY.txt`` and/or ``KEY.json``, and the deterministic order of one epoch: the shard list is
permuted by an RNG seeded with ``(seed, epoch)``; members keep their order inside a shard.
Tar reading is ``lvlm.data.sources.tar_groups``: members grouped by key per shard (a damaged shard
never leaks a half sample into the next); for local plain tars image bytes are read only when the
sample is loaded, so readers that skip a sample (other ranks and workers) never read its image.

Nothing is fatal at iteration time; each problem is counted in the ``SkipCounter`` by reason:
``missing_shard`` (local file absent), ``corrupt_shard`` (unreadable/truncated tar; the samples
read before the damage are kept), ``missing_image``, ``missing_caption``, ``bad_caption``
(undecodable .txt/.json or a non-string caption field) and ``empty_caption``. Images stay encoded
bytes; nothing is decoded here.
"""
from __future__ import annotations

import json
import os
import random
from functools import partial
from typing import Iterator, Optional

import braceexpand

from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef
from lvlm.data.sources.tar_groups import Value, iter_tar_groups, read_member
from lvlm.data.sources.tar_groups import is_local as _is_local
from lvlm.data.sources.tar_groups import local_path as _local_path

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image member suffixes, in order of preference when a key has several."""


def expand_shards(pattern: str) -> list[str]:
    """'::'-separated list of brace patterns -> the shard list, in the order written."""
    shards: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            shards.extend(braceexpand.braceexpand(part))
    return shards


class WebDatasetCaptionSource:
    """Caption pairs from img2dataset-layout shards (see the module docstring)."""

    def __init__(self, shards: str, *, caption_key: str = "txt", name: str = "webdataset") -> None:
        if not isinstance(shards, str) or not shards.strip():
            raise ValueError(f"shards must be a non-empty shard pattern, got {shards!r}")
        if not caption_key:
            raise ValueError(f"caption_key must be 'txt' or a .json field name, got {caption_key!r}")
        self.pattern = shards
        self.caption_key = caption_key
        self.name = name
        self.shards = expand_shards(shards)
        if not self.shards:
            raise FileNotFoundError(f"shard pattern {shards!r} expands to no shard")
        has_remote = any(not _is_local(_local_path(u)) for u in self.shards)
        if not has_remote and not any(os.path.isfile(_local_path(u)) for u in self.shards):
            raise FileNotFoundError(
                f"no shard file matches {shards!r} ({len(self.shards)} path(s) tried, e.g. {self.shards[0]!r})"
            )

    def shard_order(self, seed: int, epoch: int) -> list[str]:
        """The shard list permuted for ``(seed, epoch)`` (string-seeded: stable across processes)."""
        order = list(self.shards)
        random.Random(f"lvlm.webdataset/{seed}/{epoch}").shuffle(order)
        return order

    def iter_refs(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[SampleRef]:
        for url in self.shard_order(seed, epoch):
            yield from self._iter_shard(url, skips)

    def iter_samples(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[Sample]:
        for ref in self.iter_refs(seed, epoch, skips):
            yield ref.load()

    # ------------------------------------------------------------------------------ internals

    def _iter_shard(self, url: str, skips: SkipCounter) -> Iterator[SampleRef]:
        for key, members in iter_tar_groups(url, skips, missing_reason="missing_shard"):
            group = {ext.lower(): value for ext, value in reversed(list(members.items()))}  # first one wins
            group["__key__"] = key
            ref = self._make_ref(group, url, skips)
            if ref is not None:
                yield ref

    def _caption(self, group: dict, skips: SkipCounter) -> Optional[str]:
        try:
            if self.caption_key == "txt":
                if "txt" not in group:
                    skips.add("missing_caption")
                    return None
                caption = group["txt"].decode("utf-8")
            else:
                if "json" not in group:
                    skips.add("missing_caption")
                    return None
                meta = json.loads(group["json"].decode("utf-8"))
                if not isinstance(meta, dict) or meta.get(self.caption_key) is None:
                    skips.add("missing_caption")
                    return None
                caption = meta[self.caption_key]
                if not isinstance(caption, str):
                    skips.add("bad_caption")
                    return None
        except (UnicodeDecodeError, json.JSONDecodeError):
            skips.add("bad_caption")
            return None
        caption = caption.strip()
        if not caption:
            skips.add("empty_caption")
            return None
        return caption

    def _make_ref(self, group: dict, url: str, skips: SkipCounter) -> Optional[SampleRef]:
        image = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
        if image is None:
            skips.add("missing_image")
            return None
        caption = self._caption(group, skips)
        if caption is None:
            return None
        key = group["__key__"]
        return SampleRef(key=key, loader=partial(_build_sample, image, caption, key, self.name, url))


def _build_sample(image: Value, caption: str, key: str, source: str, url: str) -> Sample:
    return Sample(
        segments=[ImageSegment(read_member(image)), TextSegment(caption, role="assistant")],
        key=key,
        source=source,
        meta={"shard": url},
    )
