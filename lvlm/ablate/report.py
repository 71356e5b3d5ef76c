"""A grid's report from its cells' ``result.json``: ``results.md``, ``results.csv``, ``mir_vs_score.png``.

The Markdown holds one row per cell (axis values, final loss, MIR at start and final, score, status),
the Spearman rank correlations of final MIR, start MIR and final loss with the score (MIR: lower is
better, so the MIR paper predicts a negative correlation), and how MIR moved from start to final.
Spearman uses average ranks for ties (scipy is not required). Cells without a result are "pending".
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from lvlm.ablate.grid import Cell, Grid


def average_ranks(xs: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); None for n < 2 or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: lengths differ ({len(xs)} vs {len(ys)})")
    if len(xs) < 2:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def load_results(grid: Grid, cells: list[Cell], digests: dict[str, str] | None = None) -> list[dict]:
    """Each cell's result.json in grid order (a stub with status "pending" where there is none, "pending (stale
    result)" where its hash is not the cell's: ``digests`` by cell name when the caller has them, else
    ``Grid.digest``)."""
    out = []
    for cell in cells:
        path = grid.cell_dir(cell) / "result.json"
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            r = {"status": "pending"}
        if r.get("hash") not in (None, digests[cell.name] if digests else grid.digest(cell)):
            r = {"status": "pending (stale result)"}
        out.append({"cell": cell.name, "values": cell.values, **{k: v for k, v in r.items() if k != "values"}})
    return out


def _num(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _pairs(results: list[dict], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    rows = [r for r in results if r.get("status") == "ok" and r.get(xkey) is not None and r.get(ykey) is not None]
    return [r[xkey] for r in rows], [r[ykey] for r in rows]


def correlations(results: list[dict]) -> dict[str, tuple[float | None, int]]:
    """Spearman rho and n for (final MIR, score), (start MIR, score), (final loss, score), (start, final MIR)."""
    out = {}
    for name, x, y in (("final MIR vs score", "mir_final", "score"), ("MIR at start vs score", "mir_first", "score"),
                       ("final loss vs score", "final_loss", "score"),
                       ("MIR at start vs final MIR", "mir_first", "mir_final")):
        xs, ys = _pairs(results, x, y)
        out[name] = (spearman(xs, ys), len(xs))
    return out


def _mir_stage_note(grid: Grid, results: list[dict]) -> str:
    """For a pipeline grid: which stage the MIR columns come from (as the cells recorded it), and a warning
    when some cell's MIR is from another stage than the grid's ``mir_stage`` (re-run the grid to fix)."""
    if not grid.is_pipeline:
        return ""
    got = sorted({str(r["mir_stage"]) for r in results if r.get("mir_stage")})
    text = f" · MIR from stage {', '.join(got) or grid.mir_stage or '-'}"
    if grid.mir_stage and got and got != [grid.mir_stage]:
        text += f" (grid asks for {grid.mir_stage}: run the grid without --report to summarise again)"
    return text


def markdown(grid: Grid, results: list[dict]) -> str:
    axes = [a.key for a in grid.axes]
    lines = [f"# Ablation: {grid.paper or grid.path.stem}", "",
             f"grid `{grid.path}` · base `{grid.base_as_written}` · mode {grid.mode} · {len(results)} cells · "
             f"score {grid.score.type}" + (f" (stage {grid.score.stage})" if grid.score.stage else "")
             + _mir_stage_note(grid, results), "",
             "| cell | " + " | ".join(axes) + " | final loss | MIR at start | MIR final | ΔMIR | score | status |",
             "|---" * (len(axes) + 7) + "|"]
    for r in results:
        d = None if r.get("mir_first") is None or r.get("mir_final") is None else r["mir_final"] - r["mir_first"]
        cols = [r["cell"], *(str(r["values"].get(a, "")) for a in axes), _num(r.get("final_loss")),
                _num(r.get("mir_first")), _num(r.get("mir_final")), _num(d, "+.4f"), _num(r.get("score")),
                str(r.get("status"))]
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "## Spearman rank correlation (cells with status ok)", ""]
    for name, (rho, n) in correlations(results).items():
        lines.append(f"- {name}: " + (f"rho = {rho:+.3f} (n = {n})" if rho is not None
                                      else f"n/a (n = {n}{'' if n < 2 else ', a constant side'})"))
    lines += ["", "MIR is lower-is-better: the MIR paper predicts final MIR and score to correlate negatively.", "",
              "## MIR at start vs final", ""]
    both = [r for r in results if r.get("mir_first") is not None and r.get("mir_final") is not None]
    if both:
        fell = sum(r["mir_final"] < r["mir_first"] for r in both)
        start = sum(r["mir_first"] for r in both) / len(both)
        final = sum(r["mir_final"] for r in both) / len(both)
        lines.append(f"MIR fell in {fell} of {len(both)} cells; mean {start:.4f} at start -> {final:.4f} final "
                     f"({final - start:+.4f}).")
    else:
        lines.append("no cell logged MIR at two points (set mir.every > 0).")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, grid: Grid, results: list[dict]) -> None:
    axes = [a.key for a in grid.axes]
    cols = ["first_loss", "final_loss", "mir_first", "mir_final", "score", "seconds", "status"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", *axes, *cols, "per_type"])
        for r in results:
            w.writerow([r["cell"], *(r["values"].get(a, "") for a in axes), *("" if r.get(c) is None else r[c]
                                                                              for c in cols),
                        "" if r.get("per_type") is None else json.dumps(r["per_type"], sort_keys=True)])


def plot(path: Path, results: list[dict], rho: float | None) -> Path | None:
    """MIR (x) against score (y), one labelled point per cell; None when no cell has both."""
    xs, ys = _pairs(results, "mir_final", "score")
    if not xs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["cell"] for r in results if r.get("status") == "ok" and r.get("mir_final") is not None
             and r.get("score") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(xs, ys, color="tab:red")
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("MIR (final; lower is better)")
    ax.set_ylabel("score")
    ax.set_title("MIR vs score" + (f" (Spearman rho = {rho:+.3f})" if rho is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(grid: Grid, cells: list[Cell], digests: dict[str, str] | None = None) -> str:
    """Write results.md, results.csv and (with scores) mir_vs_score.png into the grid's run dir;
    returns the Markdown, for printing."""
    grid.run_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(grid, cells, digests)
    text = markdown(grid, results)
    (grid.run_dir / "results.md").write_text(text)
    write_csv(grid.run_dir / "results.csv", grid, results)
    png = plot(grid.run_dir / "mir_vs_score.png", results, correlations(results)["final MIR vs score"][0])
    return text + f"\nwritten: {grid.run_dir / 'results.md'}, results.csv" + (", mir_vs_score.png" if png else "")
