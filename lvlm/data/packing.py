"""Sequence packing: several TokenizedSamples per row, each attending only to itself.

Owns the bin-packing plan, the packed row layout and the packed collate. Packing is
deterministic: ``order="arrival"`` is first-fit in arrival order (each sample goes into the first
row that still has room, rows opened in arrival order); ``order="decreasing"`` is
first-fit-decreasing (samples visited longest first, ties by arrival index). In both cases the
samples inside a row keep their arrival order. A sample is never split or truncated, so an image
span is never cut; a sample longer than ``max_length`` is an error (the tokenizer already
truncates to ``max_length``).

Row layout (before padding): the samples' ``input_ids`` and ``labels`` concatenated,
``position_ids`` restarting at 0 for each sample and ``sequence_ids`` = the sample's index within
the row (0, 1, ...). In the batch, padding (right side) has ``sequence_ids`` -1, label -100,
attention 0 and ``position_ids`` counting again from 0, so the padding run looks like one more
sequence to position-id based packing detection (flash-attention varlen) and never extends a
real sample.

Labels: the model predicts token t+1 from position t. The first token of a packed sample must not
be predicted from the previous sample's last token, so the packed collate sets the label of each
sample's first token to -100. In an unpadded batch that label is never used either (there is no
position before it), so per-sample losses are identical to the unpacked case and
``num_supervised_tokens`` equals the number of positions the model actually scores.

Batch keys: those of ``lvlm.data.collate.collate`` (``keys`` in packed order, row by row, which
is also the order of ``pixel_values``) plus ``position_ids`` and ``sequence_ids`` (long [B, L]),
``padding_waste`` (float: padded positions / all positions of the batch) and ``num_rows``.
Assumes image decoding and transforms behave as in ``collate`` (its helpers are reused).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from lvlm.data.collate import (ImageTransform, _transform, check_batch_args, decode_samples, dummy_batch,
                               stack_pixels)
from lvlm.data.sample import ImageSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.tokenize import IGNORE_INDEX, TokenizedSample

PACKING_ORDERS = ("arrival", "decreasing")


@dataclass
class PackedRow:
    """One packed row, unpadded."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    """Concatenated labels; the first token of every sample is set to -100 (see module docstring)."""
    position_ids: list[int] = field(default_factory=list)
    sequence_ids: list[int] = field(default_factory=list)
    images: list[ImageSegment] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """Positions of this row's samples in the list given to ``pack``."""

    def __len__(self) -> int:
        return len(self.input_ids)


def plan_packing(lengths: Sequence[int], max_length: int, order: str = "arrival") -> list[list[int]]:
    """Assign sample indices to rows of at most ``max_length`` tokens; each row lists indices ascending."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if order not in PACKING_ORDERS:
        raise ValueError(f"packing order must be one of {PACKING_ORDERS}, got {order!r}")
    for i, n in enumerate(lengths):
        if n < 1 or n > max_length:
            raise ValueError(f"sample {i} has length {n}; packing needs 1 <= length <= max_length={max_length}")
    visit = list(range(len(lengths)))
    if order == "decreasing":
        visit.sort(key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in visit:
        for r, filled in enumerate(used):
            if filled + lengths[i] <= max_length:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return [sorted(row) for row in rows]


def plan_from_rows(lengths: Sequence[int], max_length: int, rows: Sequence[int]) -> list[list[int]]:
    """The plan of a given assignment: ``rows[i]`` is sample i's row (e.g. ``RowFiller.placed``). Rows are
    listed by their lowest sample index; an assignment that overfills a row is an error."""
    if len(rows) != len(lengths):
        raise ValueError(f"row assignment has {len(rows)} entries for {len(lengths)} samples")
    plan: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        plan.setdefault(r, []).append(i)
    for r, indices in plan.items():
        if sum(lengths[i] for i in indices) > max_length:
            raise ValueError(f"row {r} holds {sum(lengths[i] for i in indices)} tokens, more than "
                             f"max_length={max_length}")
    return list(plan.values())


def pack(samples: Sequence[TokenizedSample], max_length: int, order: str = "arrival",
         rows: Optional[Sequence[int]] = None) -> list[PackedRow]:
    """Pack ``samples`` into rows (see the module docstring for the layout): planned in ``order``, or
    the given assignment ``rows`` (sample i goes into row ``rows[i]``)."""
    for sample in samples:
        if len(sample.labels) != len(sample.input_ids):
            raise ValueError(f"sample {sample.key!r}: {len(sample.input_ids)} input ids but "
                             f"{len(sample.labels)} labels")
    lengths = [len(s.input_ids) for s in samples]
    plan = plan_packing(lengths, max_length, order) if rows is None else plan_from_rows(lengths, max_length, rows)
    rows = []
    for indices in plan:
        row = PackedRow()
        for segment, i in enumerate(indices):
            sample = samples[i]
            n = len(sample.input_ids)
            row.input_ids.extend(sample.input_ids)
            row.labels.append(IGNORE_INDEX)  # never predicted across the sample boundary
            row.labels.extend(sample.labels[1:])
            row.position_ids.extend(range(n))
            row.sequence_ids.extend([segment] * n)
            row.images.extend(sample.images)
            row.keys.append(sample.key)
            row.indices.append(i)
        rows.append(row)
    return rows


def padding_waste(row_lengths: Sequence[int], padded_length: int) -> float:
    """Padded positions / all positions of a batch of ``len(row_lengths)`` rows padded to ``padded_length``."""
    total = len(row_lengths) * padded_length
    if total == 0:
        return 0.0
    if any(n < 0 or n > padded_length for n in row_lengths):
        raise ValueError(f"row lengths {list(row_lengths)} do not fit in padded length {padded_length}")
    return (total - sum(row_lengths)) / total


def _dummy_batch(pad_token_id: int, image_size: int) -> dict[str, Any]:
    """``collate``'s dummy plus the packing keys."""
    return {**dummy_batch(pad_token_id, image_size), "position_ids": torch.zeros((1, 1), dtype=torch.long),
            "sequence_ids": torch.zeros((1, 1), dtype=torch.long), "num_rows": 1}


def packed_collate(
    samples: list[TokenizedSample],
    image_transform: ImageTransform,
    pad_token_id: int,
    image_size: int,
    max_length: int,
    skips: Optional[SkipCounter] = None,
    order: str = "arrival",
    pad_to_max_length: bool = False,
    rows: Optional[Sequence[int]] = None,
    by_source: bool = False,
) -> dict[str, Any]:
    """Decode images, drop samples with a corrupt image (``corrupt_image``), pack and pad to one batch.

    The row layout is planned in ``order``, or given: ``rows[i]`` is sample i's row (the loader passes
    ``RowFiller.placed``, so a batch never has more rows than the filler allowed; a dropped sample only
    leaves a gap). Rows are padded to the longest row, or to ``max_length`` with ``pad_to_max_length``.
    ``by_source``: see ``decode_samples``.
    """
    check_batch_args(pad_token_id, image_size)
    if rows is not None and len(rows) != len(samples):
        raise ValueError(f"row assignment has {len(rows)} entries for {len(samples)} samples")
    row_of = {id(sample): r for sample, r in zip(samples, rows)} if rows is not None else None
    pairs = decode_samples(samples, skips, by_source)
    if not pairs:
        return _dummy_batch(pad_token_id, image_size)
    kept = [sample for sample, _ in pairs]
    decoded = [images for _, images in pairs]  # aligned with kept

    rows = pack(kept, max_length, order, None if row_of is None else [row_of[id(sample)] for sample in kept])
    length = max_length if pad_to_max_length else max(len(row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length, dtype=torch.long).repeat(len(rows), 1)  # overwritten below
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    pixels: list[torch.Tensor] = []
    keys: list[str] = []
    sources: list[str] = []
    lengths: list[int] = []
    for r, row in enumerate(rows):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[r, :n] = 1
        labels[r, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[r, n:] = torch.arange(length - n, dtype=torch.long)  # padding: its own run from 0
        sequence_ids[r, :n] = torch.tensor(row.sequence_ids, dtype=torch.long)
        for i in row.indices:
            pixels.extend(_transform(image, image_transform, image_size, kept[i].key) for image in decoded[i])
        keys.extend(row.keys)
        sources.extend(kept[i].source for i in row.indices)
        lengths.extend(len(kept[i].input_ids) for i in row.indices)

    pixel_values = stack_pixels(pixels, image_size)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "position_ids": position_ids,
        "sequence_ids": sequence_ids,
        "padding_waste": padding_waste([len(row) for row in rows], length),
        "num_rows": len(rows),
        "num_samples": len(kept),
        "num_supervised_tokens": int((labels != IGNORE_INDEX).sum().item()),
        "keys": keys,
        "sources": sources,
        "lengths": lengths,
    }


class RowFiller:
    """Streaming first-fit of samples, in arrival order, into ``rows`` rows of ``max_length`` tokens.

    Decides which consecutive samples of a stream form one packed micro-batch: ``fits(n)`` says whether a
    sample of ``n`` tokens still fits in some open row (first fit) or in a new one while fewer than
    ``rows`` are open; when it does not, the micro-batch is complete and the sample starts the next one.
    ``placed`` is the row of every sample added since the last reset: the batch's layout, handed to
    ``packed_collate`` (re-planning the same samples, e.g. first-fit-decreasing, can need more rows).
    """

    def __init__(self, rows: int, max_length: int) -> None:
        if rows < 1 or max_length < 1:
            raise ValueError(f"rows and max_length must be >= 1, got {rows} and {max_length}")
        self.rows, self.max_length = rows, max_length
        self.used: list[int] = []
        self.placed: list[int] = []

    def fits(self, n: int) -> bool:
        return any(u + n <= self.max_length for u in self.used) or len(self.used) < self.rows

    def add(self, n: int) -> None:
        """Place a sample of ``n`` tokens (``fits(n)`` must hold)."""
        if not 1 <= n <= self.max_length:
            raise ValueError(f"a sample of {n} tokens cannot be packed into rows of {self.max_length}")
        for r, u in enumerate(self.used):
            if u + n <= self.max_length:
                self.used[r] = u + n
                self.placed.append(r)
                return
        if len(self.used) >= self.rows:
            raise ValueError("no room: call fits() first and start a new batch")
        self.placed.append(len(self.used))
        self.used.append(n)

    def reset(self) -> None:
        self.used, self.placed = [], []
