"""The training loader: an infinite, exactly resumable, rank-disjoint stream of batches.

Owns the ordering contract that makes kill-and-resume exact and ranks disjoint:

* The global sample stream is infinite: epoch 0, 1, 2, ..., each the source's deterministic order
  for ``(seed, epoch)`` passed through a shuffle buffer of ``cfg.shuffle_buffer`` refs seeded by
  ``(seed, epoch)`` (0 = stream order). An epoch with no valid sample raises ``EmptySourceError``.
* Raw sample ``i`` of that stream belongs to rank ``i % world_size``; micro-batch ``g`` of a rank
  is its raw samples ``[g*B, (g+1)*B)``. Samples dropped by tokenization or image decoding are
  removed from their batch (a batch may be smaller; an empty one becomes the dummy of
  ``collate``).
* With ``cfg.num_workers = W > 0`` worker ``w`` builds batches ``start_batch + w + k*W`` in order,
  so the DataLoader's round-robin yields ``start_batch, start_batch + 1, ...``. Every process
  walks the whole stream, dropping refs that are not its own without loading them (no image
  read or decoded); only its own batches are tokenized and decoded. ``W = 0`` runs in-process
  with the same order, so batches never depend on W.

Assumes the data reads identically in every process (same files, same validity).
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lvlm.config.schema import DataConfig
from lvlm.data.collate import ImageTransform, collate
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import CaptionSource, SampleRef, build_source
from lvlm.data.tokenize import SampleTokenizer

T = TypeVar("T")


class EmptySourceError(RuntimeError):
    """A whole epoch of the source produced no valid sample (the loader would loop forever)."""


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
    source: CaptionSource, *, seed: int, shuffle_buffer: int, skips: SkipCounter
) -> Iterator[SampleRef]:
    """The infinite global stream of sample refs (see the module docstring)."""
    for epoch in itertools.count():
        rng = random.Random(f"lvlm.shuffle_buffer/{seed}/{epoch}")
        count = 0
        for ref in shuffled(source.iter_refs(seed, epoch, skips), shuffle_buffer, rng):
            count += 1
            yield ref
        if count == 0:
            raise EmptySourceError(
                f"data source {source.name!r} yielded no valid sample in epoch {epoch}; "
                f"skipped so far: {skips.as_dict()}"
            )


class CaptionBatches(IterableDataset):
    """One rank's batches, split across DataLoader workers by batch index."""

    def __init__(
        self,
        source: CaptionSource,
        sample_tokenizer: SampleTokenizer,
        *,
        image_transform: ImageTransform,
        image_size: int,
        pad_token_id: int,
        shuffle_buffer: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("micro_batch_size", micro_batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("start_batch", start_batch, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("image_size", image_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.source = source
        self.sample_tokenizer = sample_tokenizer
        self.image_transform = image_transform
        self.image_size = image_size
        self.pad_token_id = pad_token_id
        self.shuffle_buffer = shuffle_buffer
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.iter_batches(worker=0, num_workers=1)
        return self.iter_batches(worker=info.id, num_workers=info.num_workers)

    def iter_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches ``start_batch + worker + k * num_workers``, k = 0, 1, ..., in order."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker must be in [0, {num_workers}), got {worker}")
        skips = SkipCounter()
        stream = global_stream(self.source, seed=self.seed, shuffle_buffer=self.shuffle_buffer, skips=skips)
        size, pending = self.micro_batch_size, []
        for i, ref in enumerate(stream):
            if i % self.world_size != self.rank:
                continue
            batch_index, position = divmod(i // self.world_size, size)
            if batch_index < self.start_batch or (batch_index - self.start_batch) % num_workers != worker:
                continue
            pending.append(ref)
            if position == size - 1:
                yield self._make_batch(batch_index, pending, skips)
                pending = []

    def _make_batch(self, batch_index: int, refs: list[SampleRef], skips: SkipCounter) -> dict[str, Any]:
        tokenized = []
        for ref in refs:
            try:
                sample = ref.load()
            except OSError:
                skips.add("unreadable_image")
                continue
            item = self.sample_tokenizer(sample, skips)
            if item is not None:
                tokenized.append(item)
        batch = collate(tokenized, self.image_transform, self.pad_token_id, self.image_size, skips)
        batch["batch_index"] = batch_index
        batch["skipped"] = skips.as_dict()
        return batch


def build_train_loader(
    cfg: DataConfig,
    *,
    tokenizer: Any,
    image_transform: ImageTransform,
    image_size: int,
    image_token_id: int,
    tokens_per_image: int,
    bos_token_id: Optional[int],
    eos_token_id: Optional[int],
    pad_token_id: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    resolve_path: Optional[Callable[[str], str]] = None,
) -> Union[CaptionBatches, DataLoader]:
    """An infinite iterable of batches: ``collate``'s keys plus ``batch_index`` and ``skipped``
    (cumulative skip counts by reason, as seen by the process that built the batch)."""
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    needed = tokens_per_image + (bos_token_id is not None) + 1
    if cfg.max_length < needed:
        raise ValueError(
            f"data.max_length={cfg.max_length} leaves no room for one image ({tokens_per_image} tokens)"
            f"{' after bos' if bos_token_id is not None else ''} and one caption token; need >= {needed}"
        )
    source = build_source(cfg.source, resolve_path=resolve_path)
    sample_tokenizer = SampleTokenizer(
        tokenizer,
        image_token_id=image_token_id,
        tokens_per_image=tokens_per_image,
        max_length=cfg.max_length,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    dataset = CaptionBatches(
        source,
        sample_tokenizer,
        image_transform=image_transform,
        image_size=image_size,
        pad_token_id=pad_token_id,
        shuffle_buffer=cfg.shuffle_buffer,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_batch=start_batch,
    )
    if cfg.num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
