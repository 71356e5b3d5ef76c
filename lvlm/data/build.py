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

* A mixture (``cfg.mixture``) gives each named source its own infinite stream (epochs, shuffle
  buffer seeded by the source name) and interleaves them by ``lvlm.data.mixture``'s exact-ratio
  schedule; the interleaved stream is then split exactly as above. Skip reasons are prefixed with
  the source name (``captions/missing_image``); each batch reports per-source sample and token counts.
* With ``cfg.pack`` a micro-batch is ``micro_batch_size`` ROWS of ``max_length`` tokens: the rank's samples
  (same split as above: raw sample ``i`` to rank ``i % world_size``) fill rows first-fit in order until
  ``micro_batch_size`` samples were found that fit nowhere, which then open micro-batch ``g + 1``
  (``RowFiller``); the batch keeps the filler's rows, so it never has more. Exact resume and
  worker-independence hold as without packing.
* When more than ``cfg.max_skip_fraction`` of what a reader has seen was skipped (after at least
  ``MIN_SEEN_FOR_SKIP_CHECK`` samples), the reader raises ``TooManySkipsError``.

Assumes the data reads identically in every process (same files, same validity).
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Iterator, Optional, Union

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lvlm.config.schema import DataConfig
from lvlm.data.collate import ImageTransform, collate
from lvlm.data.mixture import Mixture, mix
from lvlm.data.packing import RowFiller, packed_collate
from lvlm.data.skips import PART_REASONS, PARTITIONED_REASONS, SkipCounter
from lvlm.data.sources import CaptionSource, SampleRef, build_source
from lvlm.data.stream import EmptySourceError, PrefixedSkips, global_stream  # noqa: F401 (re-exported)
from lvlm.data.tokenize import SampleTokenizer

MIN_SEEN_FOR_SKIP_CHECK = 200


class TooManySkipsError(RuntimeError):
    """More than data.max_skip_fraction of the samples read were bad."""


class TrainBatches(IterableDataset):
    """One rank's batches, split across DataLoader workers by batch index."""

    def __init__(
        self,
        sources: list[tuple[str, CaptionSource, float]],
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
        mix_by: str = "samples",
        pack: bool = False,
        max_skip_fraction: float = 1.0,
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
        if not sources:
            raise ValueError("no data source given")
        Mixture([n for n, _, _ in sources], [w for _, _, w in sources], mix_by)  # validates names/weights/unit
        self.sources = sources
        self.mix_by = mix_by
        self.pack = pack
        self.max_skip_fraction = max_skip_fraction
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

    def _skips_of(self, skips: SkipCounter, index: int) -> SkipCounter:
        return PrefixedSkips(skips, self.sources[index][0]) if len(self.sources) > 1 else skips

    def mixed_stream(self, skips: SkipCounter) -> Iterator[tuple[int, SampleRef]]:
        """The global stream of ``(source index, ref)``: one source as is, several by the mixture."""
        if len(self.sources) == 1:
            _, source, _ = self.sources[0]
            return ((0, ref) for ref in global_stream(source, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                                                       skips=skips))
        streams = [global_stream(src, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                                 skips=self._skips_of(skips, i), tag=name)
                   for i, (name, src, _) in enumerate(self.sources)]
        mixture = Mixture([n for n, _, _ in self.sources], [w for _, _, w in self.sources], self.mix_by)
        return mix(streams, mixture, self._length if self.mix_by == "tokens" else None)

    def _length(self, index: int, ref: SampleRef) -> int:
        """Token count of a sample (token-weighted mixtures); 0 when it cannot be loaded or is dropped."""
        try:
            item = self.sample_tokenizer(ref.load())
        except OSError:
            return 0
        return len(item.input_ids) if item is not None else 0

    def iter_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches ``start_batch + worker + k * num_workers``, k = 0, 1, ..., in order."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker must be in [0, {num_workers}), got {worker}")
        if self.pack:
            yield from self._iter_packed(worker, num_workers)
            return
        skips = SkipCounter()
        size, pending, loaded = self.micro_batch_size, [], 0
        for i, (index, ref) in enumerate(self.mixed_stream(skips)):
            if i % self.world_size != self.rank:
                continue
            batch_index, position = divmod(i // self.world_size, size)
            if batch_index < self.start_batch or (batch_index - self.start_batch) % num_workers != worker:
                continue
            pending.append((index, ref))
            if position == size - 1:
                yield self._make_batch(batch_index, pending, skips)
                loaded += len(pending)
                self._check_skips(skips, seen=i + 1, loaded=loaded)
                pending = []

    def _iter_packed(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Packed micro-batches: ``micro_batch_size`` rows of ``max_length`` filled first-fit, in order,
        from this rank's samples (``RowFiller``). Ranks take each source's samples in turn (the k-th sample of
        a source goes to rank k mod world), so every rank packs the mixture's ratio: dealing the mixed stream
        by position would give a 1:1 mixture's ranks one source each, and as ranks pack different lengths
        at different speeds the global ratio would drift (2 ranks, captions:text 1:1 at 256 tokens: 30/70).
        A sample that fits nowhere is held back and later ones
        keep filling the gaps; once ``micro_batch_size`` samples are held, the batch closes and the held
        ones open the next (so no sample waits more than one batch). Batch membership depends on token lengths, so every
        worker tokenizes all of the rank's samples (cheap: no image is decoded) but decodes and collates
        only its own batches; skips of a dropped sample are counted by the worker owning the open batch."""
        skips, filler = SkipCounter(), RowFiller(self.micro_batch_size, self.sample_tokenizer.max_length)
        members: list = []
        carry: list = []
        batch_index = 0
        tried = 0  # samples tokenized while this reader owned the open batch, kept or dropped: its skips' base

        def mine(g: int) -> bool:
            return g >= self.start_batch and (g - self.start_batch) % num_workers == worker

        dealt = [0] * len(self.sources)  # samples of each source dealt so far (to all ranks)
        for i, (index, ref) in enumerate(self.mixed_stream(skips)):
            dealt[index] += 1
            if (dealt[index] - 1) % self.world_size != self.rank:
                continue
            owned = mine(batch_index)
            item = self._tokenize(index, ref, self._skips_of(skips, index) if owned else SkipCounter())
            tried += owned
            if item is None:
                continue
            if filler.fits(len(item.input_ids)):
                filler.add(len(item.input_ids))
                members.append(item)
                continue
            carry.append(item)  # fits nowhere now: keeps filling with later samples, then opens the next batch
            if len(carry) < self.micro_batch_size:
                continue
            if mine(batch_index):
                yield self._collate(batch_index, members, skips, rows=filler.placed)
                self._check_skips(skips, seen=i + 1, loaded=tried)
            batch_index, members, waiting, carry = batch_index + 1, [], carry, []
            filler.reset()
            for held in waiting:  # held samples open the next batch, in order; any that still fit nowhere wait on
                if filler.fits(len(held.input_ids)):
                    filler.add(len(held.input_ids))
                    members.append(held)
                else:
                    carry.append(held)

    def _check_skips(self, skips: SkipCounter, seen: int, loaded: int) -> None:
        """Raise when the skipped fraction exceeds the limit: stream-level skips over everything the
        stream walked, sample-level ones (tokenizer, decoding) over the samples this reader loaded."""
        if self.max_skip_fraction >= 1.0:
            return
        counts = {r: n for r, n in skips.as_dict().items() if r.rsplit("/", 1)[-1] not in PART_REASONS}
        own = sum(n for r, n in counts.items() if r.rsplit("/", 1)[-1] in PARTITIONED_REASONS)
        shared = sum(counts.values()) - own
        if seen + shared < MIN_SEEN_FOR_SKIP_CHECK:
            return
        fraction = shared / (seen + shared) + own / max(loaded, 1)
        if fraction > self.max_skip_fraction:
            raise TooManySkipsError(
                f"{fraction:.1%} of the samples read were skipped, more than data.max_skip_fraction="
                f"{self.max_skip_fraction}; skipped by reason: {skips.as_dict()}")

    def _tokenize(self, index: int, ref: SampleRef, skips: SkipCounter):
        """Load and tokenize one sample (None when it is dropped; the reason goes to ``skips``)."""
        try:
            sample = ref.load()
        except OSError:
            skips.add("unreadable_image")
            return None
        sample.source = self.sources[index][0]
        return self.sample_tokenizer(sample, skips)

    def _make_batch(self, batch_index: int, refs: list[tuple[int, SampleRef]], skips: SkipCounter) -> dict[str, Any]:
        tokenized = [item for index, ref in refs
                     if (item := self._tokenize(index, ref, self._skips_of(skips, index))) is not None]
        return self._collate(batch_index, tokenized, skips)

    def _collate(self, batch_index: int, tokenized: list, skips: SkipCounter,
                 rows: list[int] | None = None) -> dict[str, Any]:
        by_source = len(self.sources) > 1  # a mixture files corrupt_image under the sample's source too
        if self.pack:  # the filler's rows: at most micro_batch_size of them
            batch = packed_collate(tokenized, self.image_transform, self.pad_token_id, self.image_size,
                                   self.sample_tokenizer.max_length, skips, rows=rows, by_source=by_source)
        else:
            batch = collate(tokenized, self.image_transform, self.pad_token_id, self.image_size, skips, by_source)
        counts: dict[str, list[int]] = {}
        for name, length in zip(batch["sources"], batch["lengths"]):
            entry = counts.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += length
        batch["source_counts"] = counts
        batch["batch_index"] = batch_index
        batch["skipped"] = skips.as_dict()
        return batch


def build_sources(cfg: DataConfig, resolve_path: Optional[Callable[[str], str]] = None
                  ) -> list[tuple[str, CaptionSource, float]]:
    """``(name, source, weight)`` for every source the data config names: the mixture, or data.source."""
    if cfg.mixture:
        return [(name, build_source(c.source, resolve_path=resolve_path, name=name), c.weight)
                for name, c in cfg.mixture.items() if c.weight > 0]  # weight 0: left out (ablations)
    source = build_source(cfg.source, resolve_path=resolve_path)
    return [(source.name, source, 1.0)]


def check_max_length(cfg: DataConfig, tokens_per_image: int, bos_token_id: Optional[int]) -> None:
    """ValueError when ``data.max_length`` leaves no room for one image and one text token."""
    needed = tokens_per_image + (bos_token_id is not None) + 1
    if cfg.max_length < needed:
        raise ValueError(
            f"data.max_length={cfg.max_length} leaves no room for one image ({tokens_per_image} tokens)"
            f"{' after bos' if bos_token_id is not None else ''} and one caption token; need >= {needed}"
        )


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
    sources: Optional[list[tuple[str, CaptionSource, float]]] = None,
) -> Union[TrainBatches, DataLoader]:
    """An infinite iterable of batches: ``collate``'s (or ``packed_collate``'s) keys plus ``batch_index``,
    ``skipped`` (cumulative skip counts by reason, as seen by the process that built the batch) and
    ``source_counts`` (source name -> [samples, tokens] in this batch). ``sources``: ``build_sources(cfg)``
    built already (training builds them before it writes anything, so a missing file is refused first)."""
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    check_max_length(cfg, tokens_per_image, bos_token_id)
    sample_tokenizer = SampleTokenizer(
        tokenizer,
        image_token_id=image_token_id,
        tokens_per_image=tokens_per_image,
        max_length=cfg.max_length,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        system_prompt=cfg.system_prompt,
    )
    dataset = TrainBatches(
        sources if sources is not None else build_sources(cfg, resolve_path),
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
        mix_by=cfg.mix_by,
        pack=cfg.pack,
        max_skip_fraction=cfg.max_skip_fraction,
    )
    if cfg.num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, worker_init_fn=_ignore_preemption)


WORKER_GRACE_S = 120
"""How long a data worker outlives a SIGTERM (see ``_ignore_preemption``)."""


def stop_workers(batches) -> None:
    """End the worker processes of a loader iterator (``iter(build_train_loader(...))``) now, the normal way
    (each gets its exit message and returns). Call it when training ends: left alive, they are only ended
    at interpreter exit, where multiprocessing SIGTERMs daemonic children, which these workers outlive by
    ``WORKER_GRACE_S`` (every run's exit took 2 minutes). No-op for an in-process (0-worker) iterator."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own shutdown path (also run by __del__)
    if shutdown is not None:
        shutdown()


def _ignore_preemption(_worker_id: int) -> None:
    """A scheduler signals the whole process group. A worker dying then would make PyTorch raise in the
    training process mid-step, before it can checkpoint; so workers ignore SIGUSR1 and outlive SIGTERM by
    ``WORKER_GRACE_S`` seconds (an alarm, whose default action ends them), while the training process
    finishes its step, stops the loader and saves. They still end with it (daemonic, parent watchdog)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(signal.alarm(0) or WORKER_GRACE_S))
