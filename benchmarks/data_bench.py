"""Benchmark: training data-loader throughput per CPU core, and padding waste with and without packing.

Owns nothing the library uses; it writes synthetic data into a temporary directory (deterministic,
seeded) and prints tables for the two targets of the data issue.

1. Throughput. img2dataset-layout caption shards (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``) holding
   512x384 photo-like JPEGs (smooth gradients, mid-frequency detail and sensor-like noise, quality 90,
   about 55 KB each) and 5-20 word captions are read through ``lvlm.data.build.build_train_loader``
   with micro-batch 32 and ``num_workers`` 0, 1, 2. The image transform is the library's own encoder
   transform, ``lvlm.models.vision.base.VisionEncoder.image_transform`` at 224 px with the CLIP
   mean/std (convert RGB, torchvision Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize: the
   same ops as ``open_clip.image_transform(224, is_train=False)``, compared numerically at start);
   the tokenizer is a word-level one built like ``tests/unit/data_fixtures.build_tokenizer``. The
   first batch is warm-up; the rate is measured over the next >= 1,024 samples. Per core is given
   twice: the wall-clock rate divided by the processes doing the work (1 with num_workers=0, else W,
   as the issue defines it) and samples per CPU second of all loader processes (main + workers, read
   from /proc), which is what survives a shared, loaded host. The main process runs torch with one
   intra-op thread (DataLoader workers always do). Then a CPU-time profile split of the in-process
   path (tar reading, JPEG decode, each transform step, tokenization, collate), measured
   candidate speed-ups of the image path, and the loader re-timed with those speed-ups applied
   in-process (monkeypatched here for measurement only; no library file is changed).
2. Padding waste. A mixture (weights 0.5 / 0.3 / 0.2 by samples) of caption shards, document-layout
   interleaved shards (1-3 images) and text jsonl with varied (log-normal) lengths is read for 100
   batches with ``data.pack`` false and true, ``num_workers`` 0 and 1 (batches must be identical),
   at max_length 512 and the toy default 128, micro-batch 16, 32 and 64. Waste is padded positions /
   all positions over the 100 batches. A first-fit-decreasing plan over the same micro-batches
   (``lvlm.data.packing.plan_packing(order="decreasing")``, not what the loader uses) is shown for
   comparison.

Usage:

    .venv/bin/python benchmarks/data_bench.py [--quick]

``--quick`` runs a small version (fewer images and samples, micro-batch 16 only; under a minute).
Targets (data issue): >= 200 samples/s per CPU core; padding waste <= 5 % with packing.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torchvision import transforms as T
from transformers import PreTrainedTokenizerFast

from lvlm.config.schema import (
    DataConfig,
    InterleavedSourceConfig,
    MixtureComponent,
    TextSourceConfig,
    WebDatasetSourceConfig,
)
from lvlm.data import sample as sample_module
from lvlm.data.build import build_train_loader
from lvlm.data.collate import collate
from lvlm.data.packing import plan_packing
from lvlm.data.sample import ImageSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource
from lvlm.data.tokenize import SampleTokenizer, TokenizedSample
from lvlm.models.vision.base import VisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 2, 3, 4
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORDS = tuple(a + b for a in _SYLLABLES[:24] for b in _SYLLABLES[-24:])  # 576 two-syllable words, 1 token each
TARGET_PER_CORE = 200.0
TARGET_WASTE = 0.05


# ------------------------------------------------------------------------------------------ shared helpers


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``WORDS`` with <pad> <unk> <s> </s> <image> (ids 0-4)."""
    model = Tokenizer(models.WordLevel(unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator([" ".join(WORDS)], trainer=trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [PAD_ID, 1, BOS_ID, EOS_ID, IMAGE_ID], ids
    return tok


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def write_tar(path: str, members: Sequence[tuple[str, bytes]]) -> None:
    """A tar file holding ``members`` = [(name, data)] in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc); NaN where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two normalised images, measured on the 0-255 pixel scale."""
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    mse = float((((a - b) * std * 255.0) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------------------ part 1 data


class PhotoMaker:
    """Deterministic photo-like RGB images: bicubic-smooth colour field + mid-frequency detail + noise."""

    def __init__(self, seed: int, width: int, height: int, noise: float = 5.0, pool: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.width, self.height = width, height
        shape = (height, width)
        self.noise = [self.rng.standard_normal((*shape, 1), dtype=np.float32) * noise
                      + self.rng.standard_normal((*shape, 3), dtype=np.float32) * (noise / 2) for _ in range(pool)]

    def array(self) -> np.ndarray:
        w, h, rng = self.width, self.height, self.rng
        base = rng.uniform(20, 235, (5, 6, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        detail = rng.uniform(103, 153, (max(1, h // 16), max(1, w // 16), 3)).astype(np.uint8)
        detail = np.asarray(Image.fromarray(detail).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        noise = np.roll(self.noise[int(rng.integers(len(self.noise)))], int(rng.integers(h * w)))
        return np.clip(smooth + detail - 128.0 + noise, 0, 255).astype(np.uint8)


def write_caption_shards(directory: str, num_samples: int, per_shard: int, seed: int = 0) -> tuple[str, float]:
    """img2dataset-layout shards of 512x384 JPEGs + captions; returns (brace pattern, mean JPEG KB)."""
    os.makedirs(directory, exist_ok=True)
    maker, rng = PhotoMaker(seed, 512, 384), random.Random(seed)
    num_shards = math.ceil(num_samples / per_shard)
    total_bytes = 0
    for s in range(num_shards):
        members = []
        for m in range(min(per_shard, num_samples - s * per_shard)):
            key = f"{s:05d}{m:04d}"
            image = jpeg(maker.array())
            caption = words(rng, rng.randint(5, 20))
            meta = {"key": key, "caption": caption, "width": 512, "height": 384, "status": "success"}
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            total_bytes += len(image)
        write_tar(os.path.join(directory, f"{s:05d}.tar"), members)
    return os.path.join(directory, f"{{00000..{num_shards - 1:05d}}}.tar"), total_bytes / num_samples / 1024


def _clip_contract(size: int) -> SimpleNamespace:
    """What the transforms read of an encoder: a CLIP's size, mean/std and resize (centre crop)."""
    return SimpleNamespace(image_size=size, mean=CLIP_MEAN, std=CLIP_STD, resize="crop")


def encoder_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The library's encoder transform (``VisionEncoder.image_transform``) for a CLIP at ``size`` px."""
    return VisionEncoder.image_transform(_clip_contract(size))


def reference_transform(size: int) -> T.Compose:
    """The torchvision composition the library's transform replaces (profiled step by step)."""
    return VisionEncoder.reference_transform(_clip_contract(size))


def check_against_open_clip(transform: Callable, size: int, image: Image.Image) -> str:
    try:
        import open_clip
    except ImportError:
        return "open_clip not installed: not compared"
    reference = open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    diff = float((reference(image) - transform(image)).abs().max())
    return f"max |difference| vs open_clip.image_transform({size}, is_train=False) = {diff:.2e}"


# ------------------------------------------------------------------------------------------ candidate speed-ups


def fast_load(self: ImageSegment) -> Image.Image:
    """``ImageSegment.load`` without the copy ``convert("RGB")`` makes of an image that is already RGB."""
    if isinstance(self.data, Image.Image):
        return self.data if self.data.mode == "RGB" else self.data.convert("RGB")
    image = Image.open(io.BytesIO(self.data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def draft_load(data: bytes, size: int, scale: Optional[int] = None) -> Image.Image:
    """Decode with libjpeg DCT scaling: by default the largest 1/2^k keeping both sides >= ``size``
    (never changes what a resize to ``size`` sees beyond resampling); ``scale`` forces 1/scale."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        target = (size, size) if scale is None else (image.size[0] // scale, image.size[1] // scale)
        image.draft("RGB", target)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


class FastTransform:
    """Same output as the encoder transform (to rounding), cheaper: no RGB copy, Resize+CenterCrop as one
    PIL resize of the crop's pre-image (``box=``), ToTensor+Normalize fused into one multiply-subtract
    (``fused``). With ``uint8=True`` it stops before normalising (normalise on the GPU instead)."""

    def __init__(self, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 fused: bool = True, uint8: bool = False) -> None:
        self.size, self.fused, self.uint8 = size, fused, uint8
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """torchvision Resize(size) (short side) then CenterCrop(size), as a box in source pixels."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if width <= height else (new_long, self.size)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=self.box(*image.size))
        if not self.fused:
            return T.functional.normalize(T.functional.to_tensor(image), self.mean, self.std)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8
        if self.uint8:
            return pixels.contiguous()
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.mul_(self.scale).sub_(self.shift)


@contextmanager
def patched_image_load(load: Callable[[ImageSegment], Image.Image]) -> Iterator[None]:
    """Swap ``ImageSegment.load`` in this process (and forked workers) for a measurement; restored after."""
    original = sample_module.ImageSegment.load
    sample_module.ImageSegment.load = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        sample_module.ImageSegment.load = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------ part 1 timing


def make_loader(cfg: DataConfig, tokenizer: Any, transform: Callable, image_size: int, tokens_per_image: int,
                micro_batch: int) -> Any:
    return build_train_loader(cfg, tokenizer=tokenizer, image_transform=transform, image_size=image_size,
                              image_token_id=IMAGE_ID, tokens_per_image=tokens_per_image, bos_token_id=BOS_ID,
                              eos_token_id=EOS_ID, pad_token_id=PAD_ID, micro_batch_size=micro_batch, rank=0,
                              world_size=1, seed=0)


@dataclass
class Throughput:
    workers: int
    samples: int
    wall: float
    main_cpu: float
    worker_cpu: float
    load: str

    @property
    def rate(self) -> float:
        return self.samples / self.wall

    @property
    def per_core_wall(self) -> float:
        return self.rate / max(1, self.workers)

    @property
    def per_cpu_second(self) -> float:
        return self.samples / (self.main_cpu + self.worker_cpu)

    @property
    def per_worker_cpu_second(self) -> float:
        return self.samples / (self.worker_cpu if self.workers else self.main_cpu)


def time_loader(pattern: str, workers: int, measure: int, tokenizer: Any, transform: Callable, image_size: int,
                micro_batch: int) -> Throughput:
    cfg = DataConfig(source=WebDatasetSourceConfig(shards=pattern), max_length=512, num_workers=workers)
    loader = make_loader(cfg, tokenizer, transform, image_size, 196, micro_batch)
    it = iter(loader)
    first = next(it)  # warm-up: worker start, first shard open
    assert first["num_samples"] == micro_batch and tuple(first["pixel_values"].shape) == (micro_batch, 3, image_size,
                                                                                           image_size)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    wall0, cpu0, wcpu0 = time.perf_counter(), time.process_time(), sum(proc_cpu_seconds(p) for p in pids)
    samples = 0
    while samples < measure:
        samples += next(it)["num_samples"]
    wall1, cpu1, wcpu1 = time.perf_counter(), time.process_time(), sum(proc_cpu_seconds(p) for p in pids)
    result = Throughput(workers, samples, wall1 - wall0, cpu1 - cpu0, wcpu1 - wcpu0, load_line())
    del it, loader
    return result


def best_of(reps: int, run: Callable[[], Throughput]) -> Throughput:
    results = [run() for _ in range(reps)]
    return max(results, key=lambda r: r.rate)


def print_throughput(title: str, rows: list[Throughput]) -> None:
    print(f"\n{title}")
    print(f"{'workers':>7} {'samples':>7} {'wall s':>7} {'samples/s':>9} {'/s/core(wall)':>13} {'main cpu s':>10} "
          f"{'wrk cpu s':>9} {'per cpu-s':>9} {'per wrk cpu-s':>13} {'target':>6}  loadavg(1,5,15)")
    for r in rows:
        ok = "ok" if r.per_cpu_second >= TARGET_PER_CORE else "MISS"
        print(f"{r.workers:>7} {r.samples:>7} {r.wall:>7.2f} {r.rate:>9.1f} {r.per_core_wall:>13.1f} "
              f"{r.main_cpu:>10.2f} {r.worker_cpu:>9.2f} {r.per_cpu_second:>9.1f} {r.per_worker_cpu_second:>13.1f} "
              f"{ok:>6}  {r.load}")


@dataclass
class Profile:
    cpu: dict[str, float] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)
    """Extra lines in us per sample, not part of the sum."""
    samples: int = 0

    def add(self, name: str, seconds: float) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + seconds


def profile_split(pattern: str, tokenizer: Any, transform: T.Compose, image_size: int, micro_batch: int,
                  num_samples: int) -> Profile:
    """CPU time of each piece of the in-process path, timed directly on the same shards."""
    clock = time.process_time
    prof = Profile()
    source = WebDatasetCaptionSource(pattern)
    skips = SkipCounter()
    t = clock()
    refs = list(source.iter_refs(0, 0, skips))
    prof.add("tar read + grouping (source.iter_refs)", (clock() - t) * num_samples / len(refs))
    t = clock()
    for url in source.shards:  # lower bound: tar headers only, seeking over member data (local, uncompressed)
        with tarfile.open(url, "r:") as tar:
            tar.getmembers()
    headers_only = (clock() - t) / len(refs) * 1e6
    prof.info["tar headers only, seeking over data (tarfile 'r:'), not in sum"] = headers_only
    refs = refs[:num_samples]
    sample_tokenizer = SampleTokenizer(tokenizer, image_token_id=IMAGE_ID, tokens_per_image=196, max_length=512,
                                       bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    steps = list(transform.transforms)
    names = ["transform: convert('RGB') copy", "transform: Resize(224, bicubic)", "transform: CenterCrop(224)",
             "transform: ToTensor", "transform: Normalize"]
    assert len(steps) == len(names), steps
    tiny = Image.new("RGB", (1, 1))
    for start in range(0, len(refs), micro_batch):
        chunk = refs[start:start + micro_batch]
        t = clock()
        samples = [ref.load() for ref in chunk]
        prof.add("sample build (ref.load)", clock() - t)
        t = clock()
        tokenized = [sample_tokenizer(s) for s in samples]
        prof.add("tokenization (SampleTokenizer)", clock() - t)
        t = clock()
        items: list[Any] = [segment.load() for item in tokenized for segment in item.images]
        prof.add("JPEG decode (ImageSegment.load, incl. its RGB copy)", clock() - t)
        for name, step in zip(names, steps):
            t = clock()
            items = [step(x) for x in items]
            prof.add(name, clock() - t)
        tensors = iter(items)
        stand_ins = [TokenizedSample(s.input_ids, s.labels, [ImageSegment(tiny)], s.key) for s in tokenized]
        t = clock()
        batch = collate(stand_ins, lambda _: next(tensors), PAD_ID, image_size)
        prof.add("collate (pad ids + stack pixels)", clock() - t)
        assert batch["num_samples"] == len(chunk)
        prof.samples += len(chunk)
    return prof


def print_profile(prof: Profile, end_to_end_us: float) -> None:
    print(f"\nProfile split, num_workers=0 path, CPU microseconds per sample over {prof.samples} samples "
          f"(time.process_time, torch 1 thread); loadavg {load_line()}")
    total = sum(prof.cpu.values()) * 1e6 / prof.samples
    for name, seconds in prof.cpu.items():
        us = seconds * 1e6 / prof.samples
        print(f"  {name:<52} {us:>8.1f} us  {100 * us / total:>5.1f} %")
    print(f"  {'sum of pieces':<52} {total:>8.1f} us  -> {1e6 / total:.0f} samples/s/core")
    print(f"  {'end-to-end loader, num_workers=0 (CPU s / sample)':<52} {end_to_end_us:>8.1f} us  "
          f"-> {1e6 / end_to_end_us:.0f} samples/s/core")
    print(f"  {'unaccounted (shuffle buffer, stream, gc, ...)':<52} {end_to_end_us - total:>8.1f} us")
    for name, us in prof.info.items():
        print(f"  [{name}] {us:.1f} us")


def time_per_item(items: Sequence[Any], fn: Callable[[Any], Any], repeat: int = 1) -> tuple[float, list[Any]]:
    """CPU microseconds per item of ``fn`` (best of ``repeat`` passes) and its outputs."""
    best, outputs = float("inf"), []
    for _ in range(repeat):
        t = time.process_time()
        outputs = [fn(x) for x in items]
        best = min(best, time.process_time() - t)
    return best * 1e6 / len(items), outputs


def time_variants(items: Sequence[bytes], variants: Sequence[Callable[[bytes], torch.Tensor]], repeat: int,
                  ) -> tuple[list[float], list[str]]:
    """CPU us per item of each variant (passes interleaved round-robin, best of ``repeat``: a shared host's
    drift hits all alike) and each one's fidelity against the first (the reference)."""
    best = [float("inf")] * len(variants)
    fidelity = [""] * len(variants)
    reference: list[torch.Tensor] = []
    for r in range(repeat):
        for v, fn in enumerate(variants):
            t = time.process_time()
            outputs = [fn(x) for x in items]
            best[v] = min(best[v], time.process_time() - t)
            if r:
                continue
            if v == 0:
                reference, fidelity[0] = outputs, "reference"
            elif outputs[0].dtype == torch.uint8:
                fidelity[v] = "uint8 pixels (C before normalising)"
            else:
                diff = max(float((a - b).abs().max()) for a, b in zip(outputs, reference))
                worst = min(psnr(a, b) for a, b in zip(outputs, reference))
                fidelity[v] = f"max|d|={diff:.2g}, min PSNR {worst:.1f} dB"
    return [b * 1e6 / len(items) for b in best], fidelity


def speedups(blobs: list[bytes], size: int, transform: Callable, large: dict[str, list[bytes]], repeat: int
             ) -> list[tuple[str, float, float, str]]:
    """(variant, CPU us/image for decode + transform, saving vs baseline, fidelity) for candidate changes."""
    fast, boxed, fast_u8 = FastTransform(size), FastTransform(size, fused=False), FastTransform(size, uint8=True)
    no_copy = T.Compose(transform.transforms[1:])  # the encoder transform without its convert("RGB") Lambda

    def baseline(b: bytes) -> torch.Tensor:
        return transform(ImageSegment(b).load())

    variants: list[tuple[str, Callable[[bytes], torch.Tensor]]] = [
        ("baseline: ImageSegment.load + encoder transform", baseline),
        ("A: no redundant RGB copies (load + transform)", lambda b: no_copy(fast_load(ImageSegment(b)))),
        ("B: A + Resize/CenterCrop as one box resize", lambda b: boxed(fast_load(ImageSegment(b)))),
        ("C: B + fused ToTensor/Normalize", lambda b: fast(fast_load(ImageSegment(b)))),
        ("D: C + draft(size) (1/2^k keeping sides >= 224)", lambda b: fast(draft_load(b, size))),
        ("E: C + forced draft 1/2 (384 -> 192, upsampled)", lambda b: fast(draft_load(b, size, scale=2))),
        ("F: C, uint8 out (normalise on the GPU)", lambda b: fast_u8(fast_load(ImageSegment(b)))),
    ]
    us, fidelity = time_variants(blobs, [fn for _, fn in variants], repeat)
    rows = [(name, u, us[0] - u, f) for (name, _), u, f in zip(variants, us, fidelity)]
    for label, group in large.items():
        scale = Image.open(io.BytesIO(group[0])).size[0] // draft_load(group[0], size).size[0]
        names = [f"{label}: baseline", f"{label}: C (no copies, box resize, fused)",
                 f"{label}: D = C + draft(size) -> 1/{scale}"]
        us, fidelity = time_variants(group, [baseline, lambda b: fast(fast_load(ImageSegment(b))),
                                             lambda b: fast(draft_load(b, size))], repeat)
        rows += [(name, u, us[0] - u, f) for name, u, f in zip(names, us, fidelity)]
    return rows


def ipc_cost(size: int, micro_batch: int, repeat: int) -> list[tuple[str, float]]:
    """CPU us per sample to move one batch's pixel tensor into shared memory (what a DataLoader worker does
    for every batch it sends), float32 vs uint8; and the stack of the batch."""
    rows = []
    for dtype in (torch.float32, torch.uint8):
        pixels = [torch.zeros((3, size, size), dtype=dtype) for _ in range(micro_batch)]
        us_stack = time_per_item([pixels] * 4, torch.stack, repeat)[0] / micro_batch
        stacked = torch.stack(pixels)
        us_share = time_per_item([stacked] * 4, lambda x: x.clone().share_memory_(), repeat)[0] / micro_batch
        us_clone = time_per_item([stacked] * 4, lambda x: x.clone(), repeat)[0] / micro_batch
        name = str(dtype).replace("torch.", "")
        rows.append((f"torch.stack of the batch, {name}", us_stack))
        rows.append((f"move to shared memory (share_memory_), {name}", us_share - us_clone))
    return rows


def part1(tmp: str, quick: bool) -> None:
    size, micro_batch = 224, 32
    num_images = 320 if quick else 1280
    measure = 256 if quick else 1024
    reps = 1 if quick else 2
    print("=" * 100)
    print("Part 1: data-loader throughput on caption shards (img2dataset layout)")
    t = time.perf_counter()
    pattern, kb = write_caption_shards(os.path.join(tmp, "captions"), num_images, per_shard=160)
    print(f"wrote {num_images} samples ({kb:.1f} KB mean JPEG, 512x384 = 0.197 MP, quality 90) in "
          f"{math.ceil(num_images / 160)} shards in {time.perf_counter() - t:.1f} s; os.cpu_count()={os.cpu_count()}; "
          f"loadavg {load_line()}")
    tokenizer = build_tokenizer()
    transform = encoder_transform(size)
    first = ImageSegment(open_first_image(pattern)).load()
    print(f"image transform: lvlm VisionEncoder.image_transform at {size} px, CLIP mean/std "
          f"({type(transform).__name__}: one box resize + fused normalisation); "
          f"{check_against_open_clip(transform, size, first)}")
    composed = reference_transform(size)  # the step-by-step profile and the speed-up table use this one
    print(f"tokenizer: word-level, {len(tokenizer)} tokens; 196 image tokens (ViT-B/16 at 224); max_length 512; "
          f"micro-batch {micro_batch}; shuffle_buffer 256; first batch excluded, >= {measure} samples measured; "
          f"best of {reps}")

    def run(workers: int, tf: Callable) -> Throughput:
        return time_loader(pattern, workers, measure, tokenizer, tf, size, micro_batch)

    baseline = [best_of(reps, lambda w=w: run(w, transform)) for w in (0, 1, 2)]
    print_throughput("Throughput, build_train_loader as is (per cpu-s = samples / CPU s of main + workers; target "
                     f">= {TARGET_PER_CORE:.0f}/s/core judged on per cpu-s):", baseline)

    prof = profile_split(pattern, tokenizer, composed, size, micro_batch, 256 if quick else 1024)
    print_profile(prof, 1e6 / baseline[0].per_cpu_second)

    blobs = list_images(pattern, 64 if quick else 256)
    large: dict[str, list[bytes]] = {}
    for label, (w, h), n in (("1024x768 (0.8 MP)", (1024, 768), 8 if quick else 32),
                             ("2048x1536 (3.1 MP)", (2048, 1536), 4 if quick else 12)):
        maker = PhotoMaker(1, w, h, pool=2)
        large[label] = [jpeg(maker.array()) for _ in range(n)]
    rows = speedups(blobs, size, composed, large, 1 if quick else 2)
    print("\nCandidate speed-ups of decode + transform (CPU us per image; 512x384 unless named; "
          f"loadavg {load_line()})")
    print(f"  {'variant':<56} {'us/image':>9} {'saved':>8}  fidelity vs baseline")
    for name, us, saved, fidelity in rows:
        print(f"  {name:<56} {us:>9.1f} {saved:>8.1f}  {fidelity}")
    print(f"\nPer-batch pixel handling (CPU us per sample, batch of {micro_batch}):")
    for name, us in ipc_cost(size, micro_batch, 1 if quick else 3):
        print(f"  {name:<56} {us:>9.1f}")

    fast = FastTransform(size)
    diff = float((fast(first) - transform(first)).abs().max())
    with patched_image_load(fast_load):
        improved = [best_of(reps, lambda w=w: run(w, fast)) for w in (0, 1, 2)]
    print_throughput("Throughput with variant C applied in-process (ImageSegment.load without RGB copy; FastTransform: "
                     f"box resize + fused ToTensor/Normalize, float32 output as now, max|d| vs baseline {diff:.2g}):",
                     improved)
    for b, i in zip(baseline, improved):
        print(f"  workers={b.workers}: per cpu-s {b.per_cpu_second:.1f} -> {i.per_cpu_second:.1f} "
              f"({100 * (i.per_cpu_second / b.per_cpu_second - 1):+.0f} %), "
              f"wall {b.rate:.1f} -> {i.rate:.1f} samples/s")


def open_first_image(pattern: str) -> bytes:
    return list_images(pattern, 1)[0]


def list_images(pattern: str, n: int) -> list[bytes]:
    source = WebDatasetCaptionSource(pattern)
    out = []
    for ref in source.iter_refs(0, 0, SkipCounter()):
        segment = ref.load().segments[0]
        assert isinstance(segment, ImageSegment) and isinstance(segment.data, bytes)
        out.append(segment.data)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------ part 2


def tiny_jpeg(index: int) -> bytes:
    return jpeg(np.full((16, 16, 3), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256), np.uint8))


def tiny_transform(image: Image.Image) -> torch.Tensor:
    """PIL -> [3, 8, 8] float (part 2 only measures token layout, not pixels)."""
    array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def write_mixture(directory: str, num_captions: int, num_docs: int, num_texts: int, seed: int = 0) -> dict[str, Any]:
    """Caption shards, document-layout interleaved shards and text jsonl with log-normal lengths."""
    rng = random.Random(seed)
    images = [tiny_jpeg(i) for i in range(64)]
    os.makedirs(directory, exist_ok=True)
    per = math.ceil(num_captions / 4)
    for s in range(4):
        members = []
        for m in range(per):
            key, caption = f"{s:05d}{m:04d}", words(rng, lognormal_int(rng, 10, 0.6, 2, 60))
            members += [(f"{key}.jpg", images[rng.randrange(64)]), (f"{key}.txt", caption.encode())]
        write_tar(os.path.join(directory, f"cap-{s:02d}.tar"), members)
    per = math.ceil(num_docs / 4)
    for s in range(4):
        members = []
        for d in range(per):
            key, segments, parts = f"doc{s}x{d:05d}", [], []
            n_images = rng.randint(1, 3)
            image_first = rng.random() < 0.5
            for i in range(n_images):
                text = {"type": "text", "text": words(rng, lognormal_int(rng, 30, 0.8, 3, 300))}
                image = {"type": "image", "member": f"img{i}.jpg"}
                segments += [image, text] if image_first else [text, image]
                parts.append((f"{key}.img{i}.jpg", images[rng.randrange(64)]))
            if rng.random() < 0.5:
                segments.append({"type": "text", "text": words(rng, lognormal_int(rng, 30, 0.8, 3, 300))})
            members += [(f"{key}.json", json.dumps({"segments": segments}).encode())] + parts
        write_tar(os.path.join(directory, f"docs-{s:02d}.tar"), members)
    per = math.ceil(num_texts / 2)
    for f in range(2):
        with open(os.path.join(directory, f"text-{f}.jsonl"), "w", encoding="utf-8") as out:
            for _ in range(per):
                out.write(json.dumps({"text": words(rng, lognormal_int(rng, 150, 0.9, 5, 1500))}) + "\n")
    return {
        "captions": (WebDatasetSourceConfig(shards=os.path.join(directory, "cap-{00..03}.tar")), 0.5),
        "interleaved": (InterleavedSourceConfig(format="webdataset",
                                                files=os.path.join(directory, "docs-{00..03}.tar")), 0.3),
        "text": (TextSourceConfig(format="jsonl", files=os.path.join(directory, "text-{0..1}.jsonl")), 0.2),
    }


@dataclass
class WasteRun:
    positions: int = 0
    padded: int = 0
    rows: int = 0
    samples: int = 0
    batch_lengths: list[list[int]] = field(default_factory=list)
    by_source: dict[str, list[int]] = field(default_factory=dict)

    @property
    def waste(self) -> float:
        return self.padded / self.positions


def read_waste(mixture: dict[str, Any], max_length: int, tokens_per_image: int, micro_batch: int, pack: bool,
               workers: int, num_batches: int, tokenizer: Any) -> WasteRun:
    cfg = DataConfig(mixture={n: MixtureComponent(source=c, weight=w) for n, (c, w) in mixture.items()},
                     max_length=max_length, pack=pack, num_workers=workers, max_skip_fraction=1.0)
    loader = make_loader(cfg, tokenizer, tiny_transform, 8, tokens_per_image, micro_batch)
    run = WasteRun()
    it = iter(loader)
    for _ in range(num_batches):
        batch = next(it)
        numel = batch["input_ids"].numel()
        padded = numel - int(batch["attention_mask"].sum())
        assert abs(padded / numel - batch["padding_waste"]) < 1e-9, (padded, numel, batch["padding_waste"])
        run.positions += numel
        run.padded += padded
        run.rows += batch["input_ids"].shape[0]
        run.samples += batch["num_samples"]
        run.batch_lengths.append(list(batch["lengths"]))
        for name, length in zip(batch["sources"], batch["lengths"]):
            run.by_source.setdefault(name, []).append(length)
    del it, loader
    return run


def planned_waste(batch_lengths: list[list[int]], max_length: int, order: str) -> float:
    """Waste of packing each micro-batch by ``plan_packing(order)`` and padding to its longest row."""
    positions = padded = 0
    for lengths in batch_lengths:
        rows = [sum(lengths[i] for i in row) for row in plan_packing(lengths, max_length, order)]
        positions += len(rows) * max(rows)
        padded += len(rows) * max(rows) - sum(rows)
    return padded / positions


def part2(tmp: str, quick: bool) -> None:
    num_batches = 20 if quick else 100
    print("\n" + "=" * 100)
    print("Part 2: padding waste, data.pack false vs true, on a caption / interleaved / text mixture")
    mixture = write_mixture(os.path.join(tmp, "mixture"), 800 if quick else 4000, 400 if quick else 2000,
                            200 if quick else 1200)
    tokenizer = build_tokenizer()
    configs = [(128, 64, "toy default: 64 px / patch 8"), (512, 64, "toy encoder"),
               (512, 196, "ViT-B/16 at 224")]
    sizes = (16,) if quick else (16, 32, 64)
    if quick:
        configs = configs[:2]
    print(f"mixture weights (samples): captions 0.5, interleaved 0.3, text 0.2; {num_batches} batches per cell; "
          f"loadavg {load_line()}")
    print(f"\n{'max_len':>7} {'img tok':>7} {'mb':>3} {'samples':>7} {'waste unpacked':>14} {'waste packed':>12} "
          f"{'FFD plan':>8} {'rows/batch':>10} {'W0==W1':>6} {'target':>6}")
    stats: dict[tuple[int, int], dict[str, list[int]]] = {}
    for max_length, tpi, _ in configs:
        for mb in sizes:
            runs = {}
            for pack in (False, True):
                for workers in (0, 1):
                    runs[pack, workers] = read_waste(mixture, max_length, tpi, mb, pack, workers, num_batches,
                                                     tokenizer)
            same = all(runs[p, 0].batch_lengths == runs[p, 1].batch_lengths and runs[p, 0].padded == runs[p, 1].padded
                       for p in (False, True))
            unpacked, packed = runs[False, 0], runs[True, 0]
            assert packed.rows <= mb * num_batches, (packed.rows, mb)  # packed: micro-batches of at most mb rows
            ffd = planned_waste(unpacked.batch_lengths, max_length, "decreasing")
            stats.setdefault((max_length, tpi), unpacked.by_source)
            ok = "ok" if packed.waste <= TARGET_WASTE else "MISS"
            print(f"{max_length:>7} {tpi:>7} {mb:>3} {unpacked.samples:>7} {100 * unpacked.waste:>13.1f}% "
                  f"{100 * packed.waste:>11.1f}% {100 * ffd:>7.1f}% {packed.rows / num_batches:>10.2f} "
                  f"{'yes' if same else 'NO':>6} {ok:>6}")
    print("\nSample lengths (tokens, after truncation) by source, micro-batch 16 run:")
    for (max_length, tpi), by_source in stats.items():
        parts = []
        for name, lengths in sorted(by_source.items()):
            arr = np.array(lengths)
            parts.append(f"{name} n={len(arr)} mean={arr.mean():.0f} p50={np.median(arr):.0f} "
                         f"p90={np.percentile(arr, 90):.0f} at max={100 * np.mean(arr == max_length):.0f}%")
        print(f"  max_length {max_length}, {tpi} image tokens: " + "; ".join(parts))
    print(f"loadavg {load_line()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small version (< 1 minute)")
    parser.add_argument("--part", choices=("all", "1", "2"), default="all", help="run one part only")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"data_bench{' --quick' if args.quick else ''}: torch {torch.__version__}, Pillow {Image.__version__}, "
          f"cpus {os.cpu_count()}, loadavg {load_line()}")
    with tempfile.TemporaryDirectory(prefix="lvlm-data-bench-") as tmp:
        if args.part in ("all", "1"):
            part1(tmp, args.quick)
        if args.part in ("all", "2"):
            part2(tmp, args.quick)
    print(f"\ntotal {time.perf_counter() - started:.1f} s; loadavg {load_line()}")


if __name__ == "__main__":
    main()
