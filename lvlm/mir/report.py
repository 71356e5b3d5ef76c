"""MIR outputs: per-layer JSON, a PNG of per-layer log10 distance, and the run's loss/MIR curve."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lvlm.mir import MIRResult


def write_report(result: MIRResult, out_dir: Path, meta: dict) -> tuple[Path, Path]:
    """``mir.json`` (MIR, per-layer FD, probe hash, ...) and ``mir_layers.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"mir": result.mir, "per_layer": result.per_layer, "cross": result.cross, **meta}
    json_path = out_dir / "mir.json"
    json_path.write_text(json.dumps(data, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = list(range(1, len(result.per_layer) + 1))
    ax.plot(layers, [math.log10(max(v, 1e-12)) for v in result.per_layer], marker="o")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("log10 FD(vision, text)")
    ax.set_title(f"MIR = {result.mir:.4f} ({result.cross})")
    fig.tight_layout()
    png_path = out_dir / "mir_layers.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def plot_run(metrics: list[dict], path: Path) -> Path:
    """Loss and MIR against steps for one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if "loss" in r and "step" in r]
    mir = [r for r in metrics if r.get("kind") == "mir"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if mir:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in mir], [r["mir"] for r in mir], color="tab:red", marker="o", label="MIR")
        ax2.set_ylabel("MIR", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
