"""Benchmark: parameters and output tokens of every connector at a given encoder/LLM size.

Owns nothing the library uses. Builds each connector with ``lvlm.models.connectors.build_connector``
on the meta device (no memory, no weights) at ``--in-dim`` (vision width), ``--out-dim`` (LLM width)
and ``--n-in`` input tokens (a square patch grid for the grid connectors), and prints one row per
configuration that fits that grid: type, settings, output tokens, parameters. The defaults are CLIP ViT-L/14-336
(1024 wide, 24 x 24 = 576 patches) into a 7B LLM (4096 wide), the setting of the MM1 connector ablation.
``--time`` also times one forward + backward of a batch of 8 images (real weights, on CUDA when
present, bf16 there, fp32 on CPU).

Usage:

    .venv/bin/python benchmarks/connectors_bench.py [--in-dim 1024] [--out-dim 4096] [--n-in 576] [--time]
"""
from __future__ import annotations

import argparse
import time

import torch

from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
    ConnectorConfig,
    LinearConnectorConfig,
    MLPConnectorConfig,
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    TokenMergeConnectorConfig,
)
from lvlm.models.connectors import build_connector

CONFIGS: list[ConnectorConfig] = [
    LinearConnectorConfig(), MLPConnectorConfig(),
    AvgPoolConnectorConfig(tokens=64), AvgPoolConnectorConfig(tokens=144), AvgPoolConnectorConfig(tokens=64, depth=1),
    TokenMergeConnectorConfig(kernel=2), TokenMergeConnectorConfig(kernel=3),
    CAbstractorConnectorConfig(tokens=64), CAbstractorConnectorConfig(tokens=144),
    ResamplerConnectorConfig(tokens=64), ResamplerConnectorConfig(tokens=144),
    QFormerConnectorConfig(tokens=32), QFormerConnectorConfig(tokens=32, layers=12),
]


def _settings(cfg: ConnectorConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in vars(cfg).items())


def _time(cfg: ConnectorConfig, in_dim: int, out_dim: int, n_in: int) -> float:
    """Milliseconds of one forward + backward of 8 images (median of 5 after 2 warm-up runs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    conn = build_connector(cfg, in_dim, out_dim).to(device, dtype)
    x = torch.randn(8, n_in, in_dim, device=device, dtype=dtype, requires_grad=True)
    times = []
    for _ in range(7):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        conn(x).float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[2:])[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-dim", type=int, default=1024, help="vision width (CLIP ViT-L: 1024)")
    parser.add_argument("--out-dim", type=int, default=4096, help="LLM width (7B: 4096)")
    parser.add_argument("--n-in", type=int, default=576, help="input tokens per image (CLIP ViT-L/14-336: 576)")
    parser.add_argument("--time", action="store_true", help="also time forward + backward of 8 images")
    args = parser.parse_args()
    rows = [("type", "settings", "tokens", "parameters") + (("fwd+bwd ms",) if args.time else ())]
    for cfg in CONFIGS:
        with torch.device("meta"):
            conn = build_connector(cfg, args.in_dim, args.out_dim)
        try:
            tokens = conn.num_tokens(args.n_in)
        except ValueError:  # a pooled token count larger than this grid: not applicable
            continue
        row = (ConnectorConfig.get_choice_name(type(cfg)), _settings(cfg), str(tokens),
               f"{sum(p.numel() for p in conn.parameters()):,}")
        rows.append(row + ((f"{_time(cfg, args.in_dim, args.out_dim, args.n_in):.1f}",) if args.time else ()))
    print(f"in_dim {args.in_dim}, out_dim {args.out_dim}, {args.n_in} input tokens")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
