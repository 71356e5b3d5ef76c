"""Caption samples from a LLaVA-style JSON file plus an image folder.

Owns the schema of ``blip_laion_cc_sbu_558k.json`` and ``llava_v1_5_mix665k.json``: a list of records
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "caption"}, ...]}`` with ``image`` relative to the image folder (a record without
``image`` is a text-only conversation, as the ~41K ShareGPT records of LLaVA-1.5's SFT mix are), and
the deterministic order of one epoch (record order permuted by an RNG seeded with
``(seed, epoch)``).

The whole file is validated when the source is built: a non-list or a record with missing or
mistyped keys raises ``ValueError`` naming the file and the first bad record index. At iteration
time a missing image file (``missing_image``) or a record without any non-empty ``gpt`` turn
(``empty_caption``) is counted and skipped; image bytes are only read by ``ref.load()``.

A sample is ``[ImageSegment, TextSegment(user)?, TextSegment(assistant), ...]`` (no ImageSegment for a
text-only record): human turns
become user text with the ``<image>`` marker removed (kept only if non-empty), gpt turns become
assistant text. ``drop_prompt=True`` (LLaVA stage-1 "plain" format) keeps only the gpt turns.
"""
from __future__ import annotations

import json
import os
import random
from functools import partial
from typing import Any, Iterator, Optional

from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef

IMAGE_MARKER = "<image>"
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _record_problem(record: Any) -> Optional[str]:
    """Why a record does not follow the schema, or None if it does."""
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    for key in ("id", "conversations"):
        if key not in record:
            return f"missing key {key!r}"
    if "image" in record and (not isinstance(record["image"], str) or not record["image"]):
        return f"'image' must be a non-empty string (or absent: a text-only record), got {record['image']!r}"
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list"
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{j}] must have 'from' and 'value'"
        if turn["from"] not in _ROLES:
            return f"conversations[{j}]['from'] is {turn['from']!r}; expected one of {sorted(_ROLES)}"
        if not isinstance(turn["value"], str):
            return f"conversations[{j}]['value'] must be a string"
    return None


def load_records(json_path: str) -> list[dict]:
    """Read and validate the JSON file (see the module docstring)."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"LLaVA JSON file not found: {json_path!r}")
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        problem = _record_problem(record)
        if problem is not None:
            raise ValueError(f"{json_path}: record {i} is malformed: {problem}")
    return records


class LLaVAJsonSource:
    """LLaVA-style JSON + image folder (see the module docstring)."""

    def __init__(
        self, json_path: str, image_folder: str, *, drop_prompt: bool = True, name: str = "llava_json"
    ) -> None:
        if not image_folder or not os.path.isdir(image_folder):
            raise FileNotFoundError(f"LLaVA image folder not found: {image_folder!r}")
        self.json_path = json_path
        self.image_folder = image_folder
        self.drop_prompt = drop_prompt
        self.name = name
        self.records = load_records(json_path)

    def __len__(self) -> int:
        return len(self.records)

    def record_order(self, seed: int, epoch: int) -> list[int]:
        """Record indices permuted for ``(seed, epoch)`` (string-seeded: stable across processes)."""
        order = list(range(len(self.records)))
        random.Random(f"lvlm.llava_json/{seed}/{epoch}").shuffle(order)
        return order

    def iter_refs(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[SampleRef]:
        for index in self.record_order(seed, epoch):
            record = self.records[index]
            segments = self._text_segments(record)
            if not any(s.role == "assistant" and s.text for s in segments):
                skips.add("empty_caption")
                continue
            path = os.path.join(self.image_folder, record["image"]) if "image" in record else None
            if path is not None and not os.path.isfile(path):
                skips.add("missing_image")
                continue
            key = str(record["id"])
            yield SampleRef(key=key, loader=partial(_build_sample, path, segments, key, self.name))

    def iter_samples(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[Sample]:
        for ref in self.iter_refs(seed, epoch, skips):
            yield ref.load()

    def _text_segments(self, record: dict) -> list[TextSegment]:
        segments = []
        for turn in record["conversations"]:
            role = _ROLES[turn["from"]]
            text = turn["value"]
            if role != "assistant" and self.drop_prompt:
                continue
            if role == "user":
                text = text.replace(IMAGE_MARKER, "")
            text = text.strip()
            if text:
                segments.append(TextSegment(text, role=role))
        return segments


def _build_sample(path: Optional[str], segments: list[TextSegment], key: str, source: str) -> Sample:
    texts = [TextSegment(s.text, s.role) for s in segments]
    if path is None:  # a text-only record
        return Sample(segments=texts, key=key, source=source, meta={})
    with open(path, "rb") as f:
        data = f.read()
    return Sample(segments=[ImageSegment(data), *texts], key=key, source=source, meta={"image_path": path})
