"""What a data config really feeds the model: shares, modalities, lengths, padding and skips.

Owns ``inspect_data``: it reads the first N samples of the global stream (one rank, in-process,
``TrainBatches`` exactly as training builds it: same sources, mixture schedule, shuffle buffers,
tokenizer, truncation and packing switch) and measures them. Images are decoded (so corrupt ones
are counted as in training) but never transformed: a 1-pixel stand-in tensor replaces the encoder
transform. ``data_spec_for`` gives the tokenizer and token counts of a model config without loading
any weights (the vision tower and connector are built on the meta device, the LLM not at all);
``format_report`` is the text ``lvlm data inspect`` prints.

Numbers: per-sample figures (shares, modality mix, length histogram) cover the first
``num_samples`` delivered samples (in batch order; when N is not a multiple of the micro-batch size
the last batch is cut, so shares may move by a sample). Padding waste covers every micro-batch read,
each computed both unpacked (pad to the longest sample) and packed (rows of ``max_length`` padded
to the longest row: the loader's own rows when ``cfg.pack``, else ``lvlm.data.packing``'s plan in
``PACK_ORDER``). Skip counts are cumulative for the whole read, including what the shuffle buffers
read ahead, with mixture reasons filed as ``source/reason``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from lvlm.config.schema import DataConfig, HFVisionConfig, ModelConfig, OpenCLIPVisionConfig
from lvlm.data.build import TrainBatches, build_sources, check_max_length
from lvlm.data.packing import plan_packing
from lvlm.data.skips import PARTITIONED_REASONS
from lvlm.data.tokenize import SampleTokenizer

PACK_ORDER = "arrival"
"""How ``TrainBatches`` packs (``RowFiller``: first fit in stream order), so the packed estimate of an unpacked
config is what packing these samples would give."""
MAX_READ_FACTOR = 20
"""Give up after reading this many times ``num_samples`` raw samples (nearly everything dropped)."""


@dataclass
class DataSpec:
    """What the data side needs from a model: the tokenizer and its special ids, tokens per image."""

    tokenizer: Any
    image_token_id: int
    tokens_per_image: int
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: int


@dataclass
class SourceStats:
    name: str
    weight: float
    target_share: float
    """weight / sum of weights: the share of samples (or tokens, mix_by=tokens) the schedule aims at."""
    samples: int = 0
    tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    sample_share: float = 0.0
    token_share: float = 0.0


@dataclass
class InspectReport:
    samples: int
    """Samples measured (== the requested number unless the stream ran dry of valid samples)."""
    requested: int
    batches: int
    micro_batch_size: int
    max_length: int
    tokens_per_image: int
    mix_by: str
    pack: bool
    sources: list[SourceStats]
    modality: dict[str, int]
    """text_only (0 images), one_image, multi_image (> 1) sample counts."""
    length: dict[str, float]
    """min, mean, max tokens per sample (image tokens included), at_max_length (samples cut or exactly full)."""
    histogram: list[dict[str, int]]
    """{lo, hi, count}: samples with lo <= tokens <= hi; counts sum to ``samples``."""
    padding: dict[str, Any]
    """unpacked/packed: padded positions / all positions; rows_unpacked/rows_packed; configured."""
    skipped: dict[str, int] = field(default_factory=dict)
    skip_fraction: float = 0.0
    """Skipped / seen, seen = raw samples put into batches + samples dropped before batching."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_spec_for(model: ModelConfig) -> DataSpec:
    """Tokenizer and token counts of ``model`` (paths resolved) without loading LLM or vision weights."""
    from torch import nn
    from transformers import AutoConfig, AutoTokenizer

    from lvlm.models.connectors import build_connector, check_fits
    from lvlm.models.llm.quirks import quirks_for
    from lvlm.models.llm.wrapper import LanguageModel
    from lvlm.models.vision import build_vision

    llm = model.llm
    common = {"trust_remote_code": llm.trust_remote_code}
    hf_config = AutoConfig.from_pretrained(llm.name_or_path, **common)
    tokenizer = AutoTokenizer.from_pretrained(llm.tokenizer or llm.name_or_path, **common)
    if llm.image_token not in tokenizer.get_vocab():  # as build_llm does
        tokenizer.add_special_tokens({"additional_special_tokens": [llm.image_token]},
                                     replace_extra_special_tokens=False)
    ids = LanguageModel(nn.Identity(), tokenizer, llm.image_token, quirks_for(hf_config.model_type))
    vision_cfg = model.vision
    if isinstance(vision_cfg, HFVisionConfig):
        vision_cfg = dataclasses.replace(vision_cfg, random_init=True)
    elif isinstance(vision_cfg, OpenCLIPVisionConfig):
        vision_cfg = dataclasses.replace(vision_cfg, pretrained="")
    with torch.device("meta"):
        vision = build_vision(vision_cfg)
        connector = build_connector(model.connector, in_dim=vision.embed_dim,
                                    out_dim=hf_config.get_text_config().hidden_size)
    return DataSpec(tokenizer, ids.image_token_id, check_fits(connector, vision), ids.bos_token_id,
                    ids.eos_token_id, ids.pad_token_id)


def _stand_in_pixels(image: Any) -> torch.Tensor:
    return torch.zeros(3, 1, 1)


def _sample_ids(batch: dict[str, Any]) -> list[torch.Tensor]:
    """Each sample's token ids, in the order of ``batch['lengths']`` (rows unpadded, then split)."""
    rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return list(torch.cat(rows).split(batch["lengths"])) if batch["lengths"] else []


def _histogram(lengths: list[int], bins: int) -> list[dict[str, int]]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * math.ceil((hi - lo + 1) / width)
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [{"lo": lo + i * width, "hi": min(hi, lo + (i + 1) * width - 1), "count": c} for i, c in enumerate(counts)]


def inspect_data(
    cfg: DataConfig,
    spec: DataSpec,
    *,
    num_samples: int = 2000,
    micro_batch_size: int = 16,
    seed: int = 0,
    resolve_path: Optional[Callable[[str], str]] = None,
    bins: int = 10,
) -> InspectReport:
    """Read the first ``num_samples`` samples of ``cfg``'s global stream and measure them (see module docstring)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    check_max_length(cfg, spec.tokens_per_image, spec.bos_token_id)
    sources = build_sources(cfg, resolve_path)
    tokenizer = SampleTokenizer(spec.tokenizer, image_token_id=spec.image_token_id,
                                tokens_per_image=spec.tokens_per_image, max_length=cfg.max_length,
                                bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                                system_prompt=cfg.system_prompt)
    stream = TrainBatches(sources, tokenizer, image_transform=_stand_in_pixels, image_size=1,
                          pad_token_id=spec.pad_token_id, shuffle_buffer=cfg.shuffle_buffer,
                          micro_batch_size=micro_batch_size, rank=0, world_size=1, seed=seed, mix_by=cfg.mix_by,
                          pack=cfg.pack, max_skip_fraction=1.0)
    total_weight = sum(w for _, _, w in sources)
    stats = {name: SourceStats(name, w, w / total_weight) for name, _, w in sources}
    modality = {"text_only": 0, "one_image": 0, "multi_image": 0}
    lengths: list[int] = []
    waste = {"real": 0, "unpacked": 0, "packed": 0, "rows_unpacked": 0, "rows_packed": 0}
    batches, skipped = 0, {}
    for batch in stream.iter_batches(worker=0, num_workers=1):
        batches += 1
        skipped = batch["skipped"]
        if batch["lengths"]:
            row_lengths = batch["lengths"]  # arrival order unless packed (then packed order: use its rows)
            rows = (batch["attention_mask"].sum(dim=1).tolist() if cfg.pack else
                    [sum(row_lengths[i] for i in row) for row in plan_packing(row_lengths, cfg.max_length, PACK_ORDER)])
            waste["real"] += sum(row_lengths)
            waste["unpacked"] += len(row_lengths) * max(row_lengths)
            waste["packed"] += len(rows) * max(rows)
            waste["rows_unpacked"] += len(row_lengths)
            waste["rows_packed"] += len(rows)
        for name, ids in zip(batch["sources"], _sample_ids(batch)):
            if len(lengths) == num_samples and not cfg.pack:  # packed batches are read whole (row order)
                break
            image_tokens = int((ids == spec.image_token_id).sum())
            images = image_tokens // spec.tokens_per_image
            entry = stats[name]
            entry.samples += 1
            entry.tokens += len(ids)
            entry.image_tokens += image_tokens
            entry.images += images
            modality["text_only" if images == 0 else "one_image" if images == 1 else "multi_image"] += 1
            lengths.append(len(ids))
        if len(lengths) >= num_samples or batches * micro_batch_size >= MAX_READ_FACTOR * num_samples:
            break
    n, tokens = len(lengths), sum(lengths)
    for entry in stats.values():
        entry.sample_share = entry.samples / n if n else 0.0
        entry.token_share = entry.tokens / tokens if tokens else 0.0
    skip_total = sum(skipped.values())
    before_batching = sum(c for r, c in skipped.items() if r.rsplit("/", 1)[-1] not in PARTITIONED_REASONS)
    seen = batches * micro_batch_size + before_batching
    positions = {k: waste[k] for k in ("unpacked", "packed")}
    return InspectReport(
        samples=n, requested=num_samples, batches=batches, micro_batch_size=micro_batch_size,
        max_length=cfg.max_length, tokens_per_image=spec.tokens_per_image, mix_by=cfg.mix_by, pack=cfg.pack,
        sources=list(stats.values()), modality=modality,
        length={"min": min(lengths, default=0), "mean": tokens / n if n else 0.0, "max": max(lengths, default=0),
                "at_max_length": sum(x >= cfg.max_length for x in lengths)},
        histogram=_histogram(lengths, bins),
        padding={**{k: (1 - waste["real"] / p if p else 0.0) for k, p in positions.items()},
                 "rows_unpacked": waste["rows_unpacked"], "rows_packed": waste["rows_packed"],
                 "configured": "packed" if cfg.pack else "unpacked"},
        skipped=dict(skipped), skip_fraction=skip_total / seen if seen else 0.0,
    )


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_report(r: InspectReport, name: str, max_skip_fraction: float = 1.0) -> str:
    """The report as the text `lvlm data inspect` prints (``name``: what was inspected)."""
    n = max(r.samples, 1)
    lines = [f"{name}: {r.samples} samples in {r.batches} micro-batches of {r.micro_batch_size} "
             f"(max_length {r.max_length}, {r.tokens_per_image} tokens/image, mix_by {r.mix_by}, pack {r.pack})"]
    if r.samples < r.requested:
        lines.append(f"  only {r.samples} of {r.requested} requested samples were valid")
    lines.append(f"\n{'source':<16}{'weight':>8}{'target':>8}{'samples':>9}{'share':>8}{'tokens':>10}{'share':>8}"
                 f"{'images':>8}")
    for s in r.sources:
        lines.append(f"{s.name:<16}{s.weight:>8g}{_pct(s.target_share):>8}{s.samples:>9}{_pct(s.sample_share):>8}"
                     f"{s.tokens:>10}{_pct(s.token_share):>8}{s.images:>8}")
    m = r.modality
    lines.append(f"\nmodality: text-only {m['text_only']} ({_pct(m['text_only'] / n).strip()}), 1 image "
                 f"{m['one_image']} ({_pct(m['one_image'] / n).strip()}), >1 images {m['multi_image']} "
                 f"({_pct(m['multi_image'] / n).strip()})")
    length = r.length
    lines.append(f"\ntokens per sample (image tokens included): min {length['min']}, mean {length['mean']:.1f}, "
                 f"max {length['max']}; {length['at_max_length']} at max_length {r.max_length}")
    top = max((b["count"] for b in r.histogram), default=1) or 1
    for b in r.histogram:
        bar = "#" * round(40 * b["count"] / top)
        lines.append(f"  {b['lo']:>6}-{b['hi']:<6} {b['count']:>7}  {bar}")
    p = r.padding
    lines.append(f"\npadding waste at micro-batch {r.micro_batch_size}: unpacked {_pct(p['unpacked']).strip()} "
                 f"({p['rows_unpacked']} rows), packed {_pct(p['packed']).strip()} ({p['rows_packed']} rows); "
                 f"configured: {p['configured']}")
    total = sum(r.skipped.values())
    reasons = ", ".join(f"{k}={v}" for k, v in r.skipped.items()) or "none"
    over = "  (over data.max_skip_fraction: training would stop)" if r.skip_fraction > max_skip_fraction else ""
    lines.append(f"\nskipped {total} ({_pct(r.skip_fraction).strip()} of seen): {reasons}{over}")
    return "\n".join(lines)
