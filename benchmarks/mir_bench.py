"""Benchmark: exact MIR per-layer distance (lvlm.mir) vs a straightforward float64 scipy.linalg.sqrtm one.

Owns nothing the library uses; it only times the two on the same synthetic, anisotropic hidden
states and prints one table row per case. Assumes numpy, scipy and torch (CPU is fine).

    .venv/bin/python benchmarks/mir_bench.py            # d = 1024 and 2048
    .venv/bin/python benchmarks/mir_bench.py --quick    # d = 1024 only
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/mir_bench.py
        # one thread each: honest numbers on a shared / oversubscribed host

Targets (issue): >= 50x faster when rows < d, >= 5x when rows > d, at equal accuracy.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import scipy.linalg
import torch

from lvlm.mir import LayerwiseMIR


def hidden_states(rng: np.random.Generator, r: int, s: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic vision [r, d] and text [s, d] rows with a few massive-activation dims, like an LLM's."""
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(d))                        # [d] decaying scales
    basis_v = np.linalg.qr(rng.normal(size=(d, d)))[0]                  # [d, d] random rotation
    basis_t = np.linalg.qr(rng.normal(size=(d, d)))[0]
    v = (rng.normal(size=(r, d)) * spectrum) @ basis_v + rng.normal(0, 0.5, d)
    t = (rng.normal(size=(s, d)) * spectrum * 0.7) @ basis_t + rng.normal(0, 0.5, d)
    hot = rng.choice(d, 4, replace=False)                               # massive activations
    v[:, hot] += 20.0 * (1.0 + 0.2 * rng.normal(size=(r, 4)))
    t[:, hot] += 15.0 * (1.0 + 0.2 * rng.normal(size=(s, 4)))
    return v, t


def scipy_fd(v: np.ndarray, t: np.ndarray) -> float:
    """The straightforward way: numpy preprocessing, np.cov, sqrtm(Sv @ St) in float64."""
    a = 1.0 / np.mean(np.linalg.norm(t, axis=1))
    v, t = v * a, t * a
    out = []
    for x in (v, t):
        n = np.linalg.norm(x, axis=1)
        m = np.sort(n)[(len(n) - 1) // 2]
        bad = np.abs(n - m) > 3 * np.std(n, ddof=1)
        x = x.copy()
        x[bad] = np.sort(x, axis=0)[(len(x) - 1) // 2]
        out.append(x)
    v, t = out
    sv, st = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    covmean = scipy.linalg.sqrtm(sv @ st)
    diff = v.mean(0) - t.mean(0)
    return float(diff @ diff + np.trace(sv) + np.trace(st) - 2 * np.real(np.trace(covmean)))


def run_case(d: int, r: int, s: int, layers: int, seed: int, repeat: int) -> dict:
    rng = np.random.default_rng(seed)
    data = [hidden_states(rng, r, s, d) for _ in range(layers)]
    t0 = time.perf_counter()
    ref = [scipy_fd(v, t) for v, t in data]
    t_scipy = time.perf_counter() - t0
    tensors = [(torch.from_numpy(v), torch.from_numpy(t)) for v, t in data]
    t_ours = math.inf
    for _ in range(repeat):                                             # best of `repeat` (noisy hosts)
        acc = LayerwiseMIR("exact")
        t0 = time.perf_counter()
        for v, t in tensors:
            acc.add_layer(v, t)
        res = acc.result()
        t_ours = min(t_ours, time.perf_counter() - t0)
    rel_fd = max(abs(a - b) / abs(b) for a, b in zip(res.per_layer, ref))
    rel_mir = abs(res.mir - math.log10(sum(ref))) / abs(math.log10(sum(ref)))
    return dict(d=d, rows_v=r, rows_t=s, layers=layers, scipy_s=t_scipy, ours_s=t_ours,
                speedup=t_scipy / t_ours, rel_fd=rel_fd, rel_mir=rel_mir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only d = 1024")
    p.add_argument("--layers", type=int, default=1, help="layers per case (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="ours: best of N runs (scipy runs once)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    dims = (1024,) if args.quick else (1024, 2048)
    rows = ((576, 900), (4000, 5000))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; scipy {scipy.__version__}; "
          f"{args.layers} layer(s) per case; times are totals over the layers; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    head = f"{'d':>5} {'rows_v':>6} {'rows_t':>6} {'scipy s':>9} {'ours s':>8} {'speedup':>8} " \
           f"{'rel diff FD':>12} {'rel diff MIR':>13}"
    print(head)
    print("-" * len(head))
    for d in dims:
        for r, s in rows:
            c = run_case(d, r, s, args.layers, args.seed, args.repeat)
            print(f"{c['d']:>5} {c['rows_v']:>6} {c['rows_t']:>6} {c['scipy_s']:>9.2f} {c['ours_s']:>8.3f} "
                  f"{c['speedup']:>7.1f}x {c['rel_fd']:>12.2e} {c['rel_mir']:>13.2e}", flush=True)


if __name__ == "__main__":
    main()
