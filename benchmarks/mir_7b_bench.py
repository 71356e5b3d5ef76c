"""Benchmark: MIR end to end (``lvlm.mir.collect.probe_mir``) on a LLaVA-1.5-7B-shaped model with random weights.

Owns nothing the library uses. It builds, without any download, a random-weight LVLM through the
real ``build_lvlm`` path (``random_init`` for both towers; the HF configs and a word-level
tokenizer are written to a temporary directory first):

* LLM: Llama, 32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000 (+ ``<image>``),
  bf16 on GPU (fp32 on CPU unless ``--dtype`` says otherwise);
* vision: CLIP ViT-L/14-336 shaped CLIPVision tower (24 layers, hidden 1024, 336 px, patch 14 ->
  576 image tokens, penultimate-layer features), random weights, cast to the LLM's dtype;
* connector: the LLaVA-1.5 2-layer GELU MLP.

Then a synthetic probe set is built in memory (no files): N = 100 samples, each
``<s>`` + a short prefix + 576 image tokens + ~1,000 random text tokens + ``</s>``, right-padded
per batch, random pixel values, and the vision/text row masks of ``lvlm.mir.probe.add_row_masks``.
``probe_mir`` is timed end to end for each configuration (the model is already on the device;
build time is reported separately; one untimed forward and one layer's distance warm up first), and one row is
printed per configuration: layers kept per pass, passes over the probe, wall seconds, peak GPU
memory (``torch.cuda.max_memory_allocated``, reset before each configuration) and peak host RSS
(``ru_maxrss``: the process-wide high-water mark since start, so it never goes down), and the MIR.
Every configuration computes the same MIR; the spread across rows is printed as a check.

Target (issue): MIR of a 7B LVLM on the N = 100 probe in under 60 s on one H100, with peak host and
GPU memory reported. On a GPU machine, from the repository root:

    .venv/bin/python benchmarks/mir_7b_bench.py
        # full size, bf16 on cuda; configurations: auto budget 8 GB, auto budget 40 GB, layers_per_pass=1
    .venv/bin/python benchmarks/mir_7b_bench.py --layers-per-pass 0 --memory-gb 8
        # only the default training-time setting (mir.layers_per_pass=0, mir.memory_gb=8)

On a CPU (tests; reduced shape: 4 layers, hidden 256, vision 2 layers hidden 128 at 56 px -> 16
image tokens, N = 8, 40 text tokens; the same code path):

    .venv/bin/python benchmarks/mir_7b_bench.py --tiny
    .venv/bin/python benchmarks/mir_7b_bench.py --tiny --threads 1   # steadier on a busy host (tiny ops)

``--layers-per-pass`` and ``--memory-gb`` take several values: one row per ``layers_per_pass > 0``
and, for ``layers_per_pass = 0`` (auto), one row per ``--memory-gb`` value.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from lvlm.config.schema import HFVisionConfig, LLMConfig, MLPConnectorConfig, ModelConfig
from lvlm.mir import LayerwiseMIR
from lvlm.mir.collect import plan_group, probe_mir, rows_per_layer
from lvlm.mir.probe import ProbeSet, add_row_masks
from lvlm.models.build import build_lvlm
from lvlm.models.lvlm import LVLM

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; random text ids are drawn from [len(SPECIALS), vocab)
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and probe shape of one benchmark size."""

    name: str
    llm_layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    image_size: int
    patch_size: int
    num_samples: int
    prefix_tokens: int  # tokens before the image span, BOS included (LLaVA v1 system prompt + "USER: ")
    text_tokens: int  # mean random text tokens after the image (each sample: +-10%), EOS excluded
    batch_size: int
    layers_per_pass: tuple[int, ...]
    memory_gb: tuple[float, ...]


FULL = Shape(name="llava-1.5-7b", llm_layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000,
             vision_layers=24, vision_hidden=1024, vision_intermediate=4096, vision_heads=16, image_size=336,
             patch_size=14, num_samples=100, prefix_tokens=36, text_tokens=1000, batch_size=8,
             layers_per_pass=(0, 1), memory_gb=(8.0, 40.0))
TINY = Shape(name="tiny", llm_layers=4, hidden=256, intermediate=688, heads=4, vocab=1000,
             vision_layers=2, vision_hidden=128, vision_intermediate=512, vision_heads=4, image_size=56,
             patch_size=14, num_samples=8, prefix_tokens=4, text_tokens=40, batch_size=4,
             layers_per_pass=(0, 1), memory_gb=(8.0, 0.001))


def peak_rss_bytes() -> int:
    """Process-wide peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def write_llm(shape: Shape, path: Path) -> Path:
    """A Llama config.json (no weights) and a word-level tokenizer with exactly ``shape.vocab`` entries."""
    LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.llm_layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=None).save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), shape.vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def write_vision(shape: Shape, path: Path) -> Path:
    """A CLIPVision config.json (no weights), CLIP ViT-L/14-336 shaped at full size."""
    CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                     num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                     image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=768,
                     hidden_act="quick_gelu").save_pretrained(path)
    return path


def build_model(shape: Shape, device: torch.device, dtype: str, attn: str, workdir: Path) -> LVLM:
    """Random-weight LVLM through build_lvlm, created directly on ``device`` and cast to ``dtype``."""
    cfg = ModelConfig(
        vision=HFVisionConfig(name_or_path=str(write_vision(shape, workdir / "vision")), random_init=True),
        connector=MLPConnectorConfig(depth=2, activation="gelu"),
        llm=LLMConfig(name_or_path=str(write_llm(shape, workdir / "llm")), random_init=True, dtype=dtype,
                      attn_implementation=attn))
    with torch.device(device):  # parameters are allocated (and randomly initialised) on the device
        model, _, _ = build_lvlm(cfg)
    model.vision.to(next(model.llm.parameters()).dtype)  # LLaVA runs the tower in the LLM's dtype
    return model.to(device).eval()


def synthetic_probe(shape: Shape, model: LVLM, seed: int) -> ProbeSet:
    """N samples of BOS + prefix + image span + random text + EOS, batched, padded, with row masks."""
    image_id, tokens = model.image_token_id, model.tokens_per_image
    if len(SPECIALS) <= image_id < shape.vocab:
        raise RuntimeError(f"image token id {image_id} lies inside the random text-id range")
    bos, eos, pad = model.llm.bos_token_id, model.llm.eos_token_id, model.llm.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    lo, hi = max(1, round(0.9 * shape.text_tokens)), max(1, round(1.1 * shape.text_tokens))
    samples = []
    for _ in range(shape.num_samples):
        n_text = int(torch.randint(lo, hi + 1, (), generator=gen))
        prefix = torch.randint(len(SPECIALS), shape.vocab, (shape.prefix_tokens - (bos is not None),), generator=gen)
        text = torch.randint(len(SPECIALS), shape.vocab, (n_text,), generator=gen)
        parts = [torch.tensor([bos] if bos is not None else [], dtype=torch.long), prefix,
                 torch.full((tokens,), image_id, dtype=torch.long), text, torch.tensor([eos], dtype=torch.long)]
        samples.append(torch.cat(parts))
    batches = []
    for start in range(0, len(samples), shape.batch_size):
        chunk = samples[start:start + shape.batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, s in enumerate(chunk):  # right padding, as lvlm.data.collate does
            ids[i, :len(s)] = s
            attn[i, :len(s)] = 1
        pixels = torch.randn(len(chunk), 3, size, size, generator=gen)
        batch = {"input_ids": ids, "attention_mask": attn, "pixel_values": pixels, "num_samples": len(chunk)}
        batches.append(add_row_masks(batch, image_id))
    digest = hashlib.sha256(f"{shape}/{seed}".encode()).hexdigest()
    return ProbeSet(batches=batches, digest=digest, num_samples=len(samples))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def warm_up(model: LVLM, probe: ProbeSet, device: torch.device, cross: str) -> None:
    """Untimed: one forward and one layer's distance on the first batch (kernels, allocator, cuBLAS/cuSOLVER)."""
    first = probe.batches[0]
    out = model(**{k: first[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")},
                output_hidden_states=True)
    h = out.hidden_states[1]
    LayerwiseMIR(cross=cross).add_layer(h[first["vision_mask"].to(device)], h[first["text_mask"].to(device)])
    sync(device)


def run_config(model: LVLM, probe: ProbeSet, device: torch.device, layers_per_pass: int, memory_gb: float,
               cross: str) -> dict[str, Any]:
    """One timed probe_mir call; returns the row of the table."""
    calls = 0

    def forward(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return model(**kwargs)

    num_layers = model.llm.num_layers
    layer_bytes = rows_per_layer(probe) * model.llm.hidden_size * next(model.llm.parameters()).element_size()
    budget = memory_gb if memory_gb > 0 else 8.0  # fixed rows: the budget is unused
    group = plan_group(num_layers, layer_bytes, layers_per_pass, budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    result = probe_mir(forward, probe, num_layers, device, cross=cross, layers_per_pass=layers_per_pass,
                       memory_gb=budget)
    sync(device)
    wall = time.perf_counter() - t0
    assert result is not None
    return dict(label=config_label(layers_per_pass, memory_gb), group=group, passes=calls / len(probe.batches),
                wall=wall,
                gpu=torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
                rss=peak_rss_bytes() / GiB, mir=result.mir)


def config_label(layers_per_pass: int, memory_gb: float) -> str:
    return f"auto/{memory_gb:g}GB" if layers_per_pass == 0 else f"fixed/{layers_per_pass}"


def configurations(layers_per_pass: list[int], memory_gb: list[float]) -> list[tuple[int, float]]:
    """(layers_per_pass, memory_gb) pairs: auto rows once per budget, fixed rows once (budget unused)."""
    out: list[tuple[int, float]] = []
    for lpp in layers_per_pass:
        if lpp < 0:
            raise ValueError(f"--layers-per-pass values must be >= 0 (0 = auto), got {lpp}")
        for mem in (memory_gb if lpp == 0 else [0.0]):
            if lpp == 0 and mem <= 0:
                raise ValueError(f"--memory-gb values must be > 0, got {mem}")
            if (lpp, mem) not in out:
                out.append((lpp, mem))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="reduced shape for CPU (runs in seconds)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float16", "float32"],
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--attn", default="sdpa", help="LLM attention kernel: sdpa, eager, flash_attention_2")
    p.add_argument("--num-samples", type=int, default=0, help="probe size N (default: 100; --tiny: 8)")
    p.add_argument("--text-tokens", type=int, default=0, help="mean text tokens per sample (default 1000; tiny 40)")
    p.add_argument("--batch-size", type=int, default=0, help="probe batch size (default 8; --tiny: 4)")
    p.add_argument("--layers-per-pass", type=int, nargs="+", default=None,
                   help="one or more mir.layers_per_pass values (0 = auto from --memory-gb); default: 0 1")
    p.add_argument("--memory-gb", type=float, nargs="+", default=None,
                   help="mir.memory_gb budgets for the auto rows (default: 8 40; --tiny: 8 0.001)")
    p.add_argument("--cross", default="exact", choices=["exact", "paper-fast"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()

    base = TINY if args.tiny else FULL
    shape = dataclasses.replace(base, num_samples=args.num_samples or base.num_samples,
                                text_tokens=args.text_tokens or base.text_tokens,
                                batch_size=args.batch_size or base.batch_size)
    if shape.num_samples < 2 or shape.batch_size < 1:
        raise ValueError(f"--num-samples must be >= 2 and --batch-size >= 1, got {shape.num_samples} and "
                         f"{shape.batch_size}")
    configs = configurations(args.layers_per_pass or list(base.layers_per_pass),
                             args.memory_gb or list(base.memory_gb))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cpus)"
    print(f"torch {torch.__version__} on {where}; shape {shape.name}; dtype {dtype}; attention {args.attn}; "
          f"cross {args.cross}")

    torch.manual_seed(args.seed)
    sync(device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mir_7b_bench_") as tmp:
        model = build_model(shape, device, dtype, args.attn, Path(tmp))
    sync(device)
    build_s = time.perf_counter() - t0
    n_llm = sum(t.numel() for t in model.llm.parameters())
    n_all = sum(t.numel() for t in model.parameters())
    model_gb = f"{torch.cuda.memory_allocated(device) / GiB:.2f} GiB" if device.type == "cuda" else "-"
    print(f"model: {n_all / 1e9:.3f} B params ({n_llm / 1e9:.3f} B LLM, {model.llm.num_layers} layers, hidden "
          f"{model.llm.hidden_size}); vision {model.vision.num_layers} blocks run, {model.tokens_per_image} "
          f"image tokens; built in {build_s:.1f} s; GPU memory after build {model_gb}; "
          f"peak RSS {peak_rss_bytes() / GiB:.2f} GiB")

    probe = synthetic_probe(shape, model, args.seed)
    rows = rows_per_layer(probe)
    vision_rows = sum(int(b["vision_mask"].sum()) for b in probe.batches)
    lengths = [int(b["attention_mask"].sum()) for b in probe.batches]
    print(f"probe: N={probe.num_samples} in {len(probe.batches)} batches of <= {shape.batch_size}; "
          f"{sum(lengths) / probe.num_samples:.0f} tokens per sample on average; rows per layer: "
          f"{vision_rows} vision + {rows - vision_rows} text = {rows} "
          f"({rows * model.llm.hidden_size * next(model.llm.parameters()).element_size() / 2**20:.1f} MiB per layer)")

    warm_up(model, probe, device, args.cross)

    head = f"{'config':>14} {'layers/pass':>11} {'passes':>6} {'wall s':>8} {'s/pass':>7} " \
           f"{'peak GPU GiB':>12} {'peak RSS GiB':>12} {'MIR':>10}"
    print(head)
    print("-" * len(head))
    mirs = []
    for lpp, mem in configs:
        try:
            r = run_config(model, probe, device, lpp, mem, args.cross)
        except torch.cuda.OutOfMemoryError:  # report it and go on with the other configurations
            peak = torch.cuda.max_memory_allocated(device) / GiB
            print(f"{config_label(lpp, mem):>14} out of GPU memory (peak {peak:.2f} GiB)", flush=True)
            continue
        gpu = f"{r['gpu']:12.2f}" if r["gpu"] is not None else f"{'-':>12}"
        print(f"{r['label']:>14} {r['group']:>11} {r['passes']:>6g} {r['wall']:>8.2f} {r['wall'] / r['passes']:>7.2f} "
              f"{gpu} {r['rss']:>12.2f} {r['mir']:>10.5f}", flush=True)
        mirs.append(r["mir"])
    if mirs and all(math.isfinite(m) for m in mirs):
        print(f"MIR spread across {len(mirs)} configurations: {max(mirs) - min(mirs):.2e} (all compute the same MIR)")
    else:
        print(f"MIR values not all finite: {mirs}")
    print("target (issue): full size, N = 100, under 60 s on one H100; peak GPU memory and host RSS reported")


if __name__ == "__main__":
    main()
