"""Smoke tests of the benchmark scripts: ``mir_7b_bench.py --tiny`` and ``data_bench.py --quick`` run end to end.

Runs the script in a subprocess, as a user would, so the whole path is covered: random-weight
model written and built through ``build_lvlm``, synthetic probe, ``probe_mir`` under several
streaming configurations. Checks it exits 0, prints one table row per configuration with a finite
MIR, and that every configuration (all layers in one pass, two layers per pass, one layer per pass)
gives the same MIR. On CPU always; on CUDA (bf16) too when a GPU is present.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mir_7b_bench.py"


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """Configuration label -> the fields of its table row."""
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if fields and fields[0].startswith(("auto/", "fixed/")):
            rows[fields[0]] = fields
    return rows


def _run_tiny(*args: str) -> dict[str, list[str]]:
    """Run ``--tiny`` with ``args``; check exit status, rows and MIR; return the table rows."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "out of GPU memory" not in proc.stdout, proc.stdout
    rows = _table_rows(proc.stdout)
    assert set(rows) == {"auto/8GB", "auto/0.001GB", "fixed/1"}, proc.stdout
    # columns: config, layers/pass, passes, wall s, s/pass, peak GPU GiB, peak RSS GiB, MIR
    for fields in rows.values():
        assert float(fields[2]) == math.ceil(4 / int(fields[1])), proc.stdout  # passes over the 4 layers
        assert float(fields[6]) > 0, proc.stdout  # peak host RSS is reported
    assert rows["auto/8GB"][1] == "4" and rows["fixed/1"][1] == "1", proc.stdout
    mirs = [float(r[-1]) for r in rows.values()]
    assert all(math.isfinite(m) for m in mirs), proc.stdout
    assert max(mirs) - min(mirs) <= 1e-4, proc.stdout  # streaming layers never changes MIR
    return rows


def test_mir_7b_bench_tiny_cpu() -> None:
    rows = _run_tiny("--device", "cpu", "--threads", "1")  # one thread: tiny ops, and steady on a busy host
    assert rows["auto/0.001GB"][1:3] == ["2", "2"]  # fp32 rows: 2 of the 4 layers fit in the budget
    assert all(r[5] == "-" for r in rows.values())  # no GPU memory on CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mir_7b_bench_tiny_cuda() -> None:
    rows = _run_tiny("--device", "cuda")  # bf16 on cuda
    assert all(float(r[5]) > 0 for r in rows.values())  # peak GPU memory is reported


def test_gpu_checks_script_runs_end_to_end_at_tiny_size(tmp_path) -> None:
    """The one-call GPU runbook (benchmarks/gpu_checks.sh) works before a GPU session spends device time on it:
    it runs the gpu-marked tests (skipped here) and the benchmark, and leaves its logs in $OUT."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "LVLM_WHEELS": str(tmp_path / "none"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), "--tiny", "--device", "cpu",
                           "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cuda tests exit 0, benchmark exit 0" in (tmp_path / "machine.txt").read_text()
    assert "skipped" in (tmp_path / "cuda_tests.log").read_text()  # the gpu tests were collected
    assert "MIR spread across 3 configurations" in (tmp_path / "mir_7b.log").read_text()


def test_data_bench_quick_runs_end_to_end() -> None:
    """``benchmarks/data_bench.py --quick`` (the README's loader-throughput and padding numbers) runs through both
    parts: it had rotted twice unnoticed (an encoder stand-in without ``resize``; a check of the packed waste
    that no longer held once packed micro-batches became rows of samples)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_bench.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Part 1" in proc.stdout and "Part 2" in proc.stdout and "total" in proc.stdout, proc.stdout[-2000:]
    waste_rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["128"], ["512"])]
    assert len(waste_rows) == 2 and all(r[8] == "yes" for r in waste_rows), proc.stdout[-2000:]  # W0 == W1
