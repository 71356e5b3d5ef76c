"""Ablation grids: parsing, cell names, product/zip, validation errors, Spearman, the report, and the
runner end to end with a fake training command (no model: tests/unit/ablate_fake_train.py)."""
from __future__ import annotations

import csv
import json
import random
import shlex
import sys
from pathlib import Path

import pytest

from lvlm.ablate import GridError, load_grid, run_grid, spearman, write_report
from lvlm.ablate.values import label, safe, short_names
from lvlm.ablate.report import average_ranks
from lvlm.ablate.runner import summarize

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "toy" / "stage1.yaml"
FAKE = Path(__file__).with_name("ablate_fake_train.py")
LAUNCHER = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}"


def write_grid(tmp_path: Path, body: str, base: Path = BASE) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(f"base: {base}\nrun_dir: {tmp_path / 'runs'}\n{body}")
    return path


AXES = """
paper: "MIR Table 3"
overrides: {train: {max_steps: 3}}
axes:
  optim.lr: [1.0e-3, 5e-4]
  unlock:
    projector: {stage.train_llm: false}
    full: {stage: {train_llm: true}, optim.weight_decay: 0.1}
"""


def test_product_cells_names_and_overrides(tmp_path):
    grid = load_grid(write_grid(tmp_path, AXES), ["--mir.every", "2"])
    cells = grid.cells()
    assert [c.name for c in cells] == ["lr=1e-3__unlock=projector", "lr=1e-3__unlock=full",
                                       "lr=5e-4__unlock=projector", "lr=5e-4__unlock=full"]
    full = cells[1]
    assert full.values == {"optim.lr": "1e-3", "unlock": "full"}
    assert full.settings == {"train.max_steps": 3, "mir.every": "2", "optim.lr": 1e-3, "stage.train_llm": True,
                             "optim.weight_decay": 0.1}
    assert full.args == ["--train.max_steps", "3", "--mir.every", "2", "--optim.lr", "0.001",
                         "--stage.train_llm", "true", "--optim.weight_decay", "0.1"]
    assert cells[2].settings["optim.lr"] == 5e-4 and cells[2].args[5] == "0.0005"  # YAML 1.1 reads 5e-4 as a str
    assert grid.paper == "MIR Table 3" and grid.cell_dir(full) == tmp_path / "runs" / full.name
    again = load_grid(grid.path, ["--mir.every", "2"])
    assert grid.digest(full) == again.digest(again.cells()[1]) and grid.digest(full) != grid.digest(cells[0])


def test_digest_covers_the_base_content_not_its_path(tmp_path):
    """Editing the base YAML (or a file it inherits) changes every cell's hash, so finished cells are not
    kept with stale results; recording-only keys (logging, checkpoint cadence) do not change it."""
    base = tmp_path / "base.yaml"
    base.write_text(BASE.read_text())
    grid = load_grid(write_grid(tmp_path, "axes: {optim.lr: [1.0e-3, 5e-4]}\n", base=base))
    before = [grid.digest(c) for c in grid.cells()]
    assert len(set(before)) == 2
    logged = load_grid(grid.path, ["--train.log_every", "3", "--train.save_every", "7", "--track.tensorboard", "true"])
    assert [logged.digest(c) for c in logged.cells()] == before
    base.write_text(BASE.read_text().replace("max_steps: 300", "max_steps: 301"))
    assert "max_steps: 301" in base.read_text()
    after = [grid.digest(c) for c in grid.cells()]
    assert all(a != b for a, b in zip(after, before))
    measured = load_grid(grid.path, ["--mir.num_samples", "20"])  # MIR is a cell's result: it counts
    assert all(measured.digest(c) != d for c, d in zip(measured.cells(), after))


def test_zip_mode_and_length_mismatch(tmp_path):
    grid = load_grid(write_grid(tmp_path, "mode: zip\naxes:\n  optim.lr: [0.1, 0.2]\n"
                                          "  optim.warmup_ratio: [0, 0.05]\n"))
    assert [c.name for c in grid.cells()] == ["lr=0.1__warmup_ratio=0", "lr=0.2__warmup_ratio=0.05"]
    with pytest.raises(GridError, match=r"zip needs axes of one length.*optim.lr: 2, optim.warmup_ratio: 3"):
        load_grid(write_grid(tmp_path, "mode: zip\naxes:\n  optim.lr: [0.1, 0.2]\n"
                                       "  optim.warmup_ratio: [0, 0.05, 0.1]\n"))


@pytest.mark.parametrize("value,want", [(1e-3, "1e-3"), (5e-4, "5e-4"), (3e-4, "3e-4"), (2.5e-5, "2.5e-5"),
                                        (0.03, "0.03"), (1.0, "1"), (0.0, "0"), (2e5, "2e5"), (True, "true"),
                                        (64, "64"), ("mlp", "mlp"), ([1, 2], "1-2")])
def test_labels(value, want):
    assert label(value) == want


def test_names_are_filesystem_safe_and_unique():
    assert safe("a/b c:d") == "a-b-c-d" and safe("../x") == "x" and safe("///") == "_"
    assert short_names(["optim.lr", "unlock"]) == ["lr", "unlock"]
    assert short_names(["stages.align.optim.lr", "stages.sft.optim.lr"]) == ["align.optim.lr", "sft.optim.lr"]


@pytest.mark.parametrize("body,match", [
    ("axes: {optim.lr: [0.1]}\nbogus: 1\n", r"unknown top-level key\(s\) \['bogus'\]; valid keys: paper, base"),
    ("axes: {}\n", "'axes' is empty"),
    ("", "'axes' is empty"),
    ("axes: {optim.lr: []}\n", "axis 'optim.lr' has an empty list"),
    ("axes: {optim.lr: 0.1}\n", "must be a list of values or a mapping"),
    ("axes: {optim.lr: [0.1]}\nscore: {type: vqav2}\n", "invalid score type 'vqav2'; valid choices: toy_vqa, none"),
    ("axes: {optim.lr: [0.1]}\nscore: {type: none, stages: x}\n", r"unknown key\(s\) \['stages'\] under 'score'"),
    ("axes: {optim.lr: [0.1]}\nmode: grid\n", "invalid mode 'grid'; valid choices: product, zip"),
    ("axes: {run_dir: [a, b]}\n", "run_dir is set per cell"),
    ("axes: {optim.lr: [0.1]}\nscore: {type: none, stage: sft}\n", "needs a pipeline base"),
    ("axes: {stages.sft.optim.lr: [0.1]}\n", "addresses a pipeline stage"),
    ("axes: {optim.lr: [0.1, 0.1]}\n", "get the same name"),
    ("axes:\n  a: {x: {optim.lr: 0.1}}\n  b: {y: {optim.lr: 0.2}}\n", "both set 'optim.lr'"),
])
def test_grid_errors(tmp_path, body, match):
    with pytest.raises(GridError, match=match):
        load_grid(write_grid(tmp_path, body)).cells()


def test_missing_base_and_cli_override_on_an_axis(tmp_path):
    with pytest.raises(GridError, match="base config not found"):
        load_grid(write_grid(tmp_path, "axes: {optim.lr: [0.1]}\n", base=tmp_path / "nope.yaml"))
    with pytest.raises(GridError, match=r"\['optim.lr'\] are also grid axes"):
        load_grid(write_grid(tmp_path, "axes: {optim.lr: [0.1]}\n"), ["--optim.lr", "0.2"])


def test_pipeline_stage_names_are_checked(tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"base: {BASE}\nstages:\n  align: {{}}\n  sft: {{stage.train_llm: true}}\n")
    grid = load_grid(write_grid(tmp_path, "axes: {stages.align.optim.lr: [0.1]}\nscore: {type: none, stage: sft}\n"
                                "mir_stage: align\n", base=pipe))
    assert grid.stages == ["align", "sft"] and grid.score.stage == "sft"
    with pytest.raises(GridError, match="invalid mir_stage 'pretrain'; valid choices: align, sft"):
        load_grid(write_grid(tmp_path, "axes: {optim.lr: [0.1]}\nmir_stage: pretrain\n", base=pipe))
    with pytest.raises(GridError, match="unknown stage 'pt'; stages: align, sft"):
        load_grid(write_grid(tmp_path, "axes: {stages.pt.optim.lr: [0.1]}\n", base=pipe))


def test_pipeline_summary_picks_stages(tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"base: {BASE}\nstages:\n  align: {{}}\n  sft: {{}}\n")
    grid = load_grid(write_grid(tmp_path, "axes: {optim.lr: [0.1]}\n", base=pipe))
    cell_dir = grid.cell_dir(grid.cells()[0])
    for name, mir, losses in (("align", [(0, 4.0), (4, 3.5)], [6.0, 5.0]), ("sft", [], [3.0, 2.0])):
        (cell_dir / name).mkdir(parents=True)
        lines = [{"kind": "mir", "step": s, "mir": m} for s, m in mir]
        lines += [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (cell_dir / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    stages = [{"name": n, "run_dir": str(cell_dir / n), "done": True} for n in ("align", "sft")]
    (cell_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))
    s = summarize(grid, cell_dir)
    assert s["mir_stage"] == "align" and (s["mir_first"], s["mir_final"]) == (4.0, 3.5)
    assert (s["first_loss"], s["final_loss"], s["complete"]) == (3.0, 2.0, True)
    assert s["stages"]["align"]["final_loss"] == 5.0


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    rng = random.Random(0)
    for n in (2, 3, 5, 9, 20):
        for _ in range(20):
            xs = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(n)]
            ys = [rng.choice([1.0, 2.0, 3.0]) + (rng.random() if n > 5 else 0) for _ in range(n)]
            got = spearman(xs, ys)
            if len(set(xs)) == 1 or len(set(ys)) == 1:
                assert got is None  # scipy: nan, with a warning
            else:
                assert got == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert spearman([1.0], [2.0]) is None and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def fake_results(grid, rows):
    for cell, (status, mir0, mir1, score) in zip(grid.cells(), rows):
        d = grid.cell_dir(cell)
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "cell": cell.name, "hash": grid.digest(cell), "status": status, "first_loss": 5.0,
            "final_loss": None if mir1 is None else 1.0 + mir1, "mir_first": mir0, "mir_final": mir1, "score": score,
            "per_type": {"color": score}, "seconds": 1.5}))


def test_report_from_result_files(tmp_path):
    grid = load_grid(write_grid(tmp_path, "paper: MIR T3\naxes: {optim.lr: [0.1, 0.2, 0.3, 0.4, 0.5]}\n"))
    fake_results(grid, [("ok", 4.0, 3.0, 0.5), ("ok", 4.0, 3.2, 0.4), ("ok", 4.1, 3.5, 0.4),
                        ("failed", 4.0, None, None)])  # the 5th cell has no result: pending
    text = write_report(grid, grid.cells())
    md = (tmp_path / "runs" / "results.md").read_text()
    assert md in text and md.startswith("# Ablation: MIR T3")
    assert "| lr=0.1 | 0.1 | 4.0000 | 4.0000 | 3.0000 | -1.0000 | 0.5000 | ok |" in md
    assert "| lr=0.5 | 0.5 | - | - | - | - | - | pending |" in md
    want = spearman([3.0, 3.2, 3.5], [0.5, 0.4, 0.4])
    assert f"final MIR vs score: rho = {want:+.3f} (n = 3)" in md
    assert "MIR fell in 3 of 3 cells" in md
    rows = list(csv.DictReader(open(tmp_path / "runs" / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "pending"]
    assert rows[0]["optim.lr"] == "0.1" and float(rows[0]["mir_final"]) == 3.0
    assert json.loads(rows[0]["per_type"]) == {"color": 0.5}
    assert (tmp_path / "runs" / "mir_vs_score.png").stat().st_size > 1000


def test_report_without_scores_skips_the_plot(tmp_path):
    grid = load_grid(write_grid(tmp_path, "axes: {optim.lr: [0.1, 0.2]}\n"))
    fake_results(grid, [("ok", 4.0, 3.0, None), ("ok", 4.0, 3.2, None)])
    text = write_report(grid, grid.cells())
    assert "final MIR vs score: n/a (n = 0)" in text and "MIR at start vs final MIR" in text
    assert not (tmp_path / "runs" / "mir_vs_score.png").exists()


def calls(grid) -> dict[str, int]:
    return {c.name: len((grid.cell_dir(c) / "calls.txt").read_text().splitlines())
            if (grid.cell_dir(c) / "calls.txt").is_file() else 0 for c in grid.cells()}


def test_runner_fails_continues_skips_and_retries(tmp_path, monkeypatch):
    path = write_grid(tmp_path, AXES + f"launcher: {LAUNCHER!r}\nscore: toy_vqa\n")
    scored = []

    def scorer(run_dir, questions=None, limit=0):
        scored.append(run_dir)
        lr = json.loads((Path(run_dir) / "cell.json").read_text())["overrides"]["optim.lr"]
        return {"score": 0.2 + lr * 100, "per_type": {"color": 0.5}}

    grid = load_grid(path)
    monkeypatch.setenv("ABLATE_FAKE_FAIL", "lr=5e-4__unlock=full")
    out: list[str] = []
    assert run_grid(grid, scorer=scorer, out=out.append) == 1
    assert calls(grid) == {c.name: 1 for c in grid.cells()} and len(scored) == 3
    failed = json.loads((grid.cell_dir(grid.cells()[3]) / "result.json").read_text())
    assert failed["status"] == "failed" and "boom" in failed["log_tail"] and failed["returncode"] == 1
    ok = json.loads((grid.cell_dir(grid.cells()[1]) / "result.json").read_text())
    assert ok["status"] == "ok" and ok["mir_first"] == 4.0 and ok["mir_final"] == pytest.approx(2.5)
    assert ok["final_loss"] == pytest.approx(4.7) and ok["first_loss"] == pytest.approx(4.9)
    assert ok["score"] == pytest.approx(0.3) and ok["per_type"] == {"color": 0.5}
    assert [m["step"] for m in ok["mir"]] == [0, 3]
    cell = json.loads((grid.cell_dir(grid.cells()[1]) / "cell.json").read_text())
    assert cell["args"][-2:] == ["--optim.weight_decay", "0.1"] and cell["command"][-2] == "--run_dir"
    assert "fake training" in (grid.cell_dir(grid.cells()[1]) / "train.log").read_text()
    assert "1 cell(s) not ok: lr=5e-4__unlock=full" in out[-1]
    assert "| lr=5e-4__unlock=full | 5e-4 | full |" in (tmp_path / "runs" / "results.md").read_text()

    monkeypatch.delenv("ABLATE_FAKE_FAIL")
    out.clear()
    assert run_grid(load_grid(path), scorer=scorer, out=out.append) == 0
    assert sum("skip (done)" in line for line in out) == 3
    assert calls(grid) == {**{c.name: 1 for c in grid.cells()}, "lr=5e-4__unlock=full": 2}
    assert "(again: last attempt failed)" in "\n".join(out)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "results.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert (tmp_path / "runs" / "mir_vs_score.png").is_file()

    # a changed override changes the hash: that cell starts over, its earlier attempt kept under superseded/
    out.clear()
    changed = load_grid(path, ["--mir.every", "1"])
    cell_dir = grid.cell_dir(grid.cells()[1])
    assert run_grid(changed, scorer=scorer, out=out.append, only="lr=1e-3__unlock=full") == 0
    assert "settings changed" in out[0] and "starting over" in out[0]
    assert calls(grid)["lr=1e-3__unlock=full"] == 1  # a fresh run dir, not the earlier run continued
    (old,) = (cell_dir / "superseded").iterdir()
    assert len((old / "calls.txt").read_text().splitlines()) == 1 and (old / "result.json").is_file()
    assert json.loads((cell_dir / "result.json").read_text())["hash"] == changed.digest(changed.cells()[1])
    out.clear()
    assert run_grid(changed, scorer=scorer, out=out.append, only="lr=1e-3__unlock=full") == 0
    assert "skip (done)" in out[0]


def test_bad_axis_key_fails_before_any_cell_runs(tmp_path):
    path = write_grid(tmp_path, f"launcher: {LAUNCHER!r}\naxes:\n  optim.lr: [0.1, 0.2]\n  unlock:\n"
                                "    a: {stage.train_llm: true}\n    b: {stage.train_lm: true}\n")
    with pytest.raises(GridError, match=r"cell lr=0\.1__unlock=b: unknown key\(s\) train_lm under 'stage'; "
                                        r"valid keys: .*train_llm.*\(command line: --stage\.train_lm\)"):
        run_grid(load_grid(path), out=lambda s: None)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(GridError, match="optim.lr.*must be > 0"):
        run_grid(load_grid(write_grid(tmp_path, "axes: {optim.lr: [-1.0]}\n")), out=lambda s: None)


def test_dry_run_only_and_cli(tmp_path, capsys):
    from lvlm.cli.main import main

    path = write_grid(tmp_path, AXES + f"launcher: {LAUNCHER!r}\n")
    assert main(["ablate", str(path), "--dry-run", "--mir.every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4] lr=5e-4__unlock=full (pending)" in printed and "--mir.every 2" in printed
    assert not (tmp_path / "runs").exists()
    assert main(["ablate", str(path), "--only", "nope"]) == 2
    assert "no such cell" in capsys.readouterr().err
    assert main(["ablate", str(path), "--only", "lr=1e-3__unlock=projector"]) == 0
    assert calls(load_grid(path)) == {"lr=1e-3__unlock=projector": 1, "lr=1e-3__unlock=full": 0,
                                      "lr=5e-4__unlock=projector": 0, "lr=5e-4__unlock=full": 0}
    assert "| lr=1e-3__unlock=full | 1e-3 | full | - | - | - | - | - | pending |" in capsys.readouterr().out
    assert main(["ablate", str(path), "--report"]) == 0
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2


def test_pipeline_cells_are_validated_stage_by_stage(tmp_path, capsys):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"base: {BASE}\nstages:\n  align: {{}}\n  sft: {{stage: {{train_llm: true}}}}\n")
    good = write_grid(tmp_path, "axes: {stages.sft.optim.lr: [1.0e-4, 2e-5]}\nscore: {type: none, stage: sft}\n",
                      base=pipe)
    assert run_grid(load_grid(good, ["--train.max_steps", "3"]), dry_run=True, out=print) == 0
    printed = capsys.readouterr().out
    assert "[2/2] lr=2e-5 (pending)" in printed and "--stages.sft.optim.lr 2e-05 --run_dir" in printed
    bad = write_grid(tmp_path, "axes: {stages.sft.optim.lrr: [1.0e-4]}\n", base=pipe)
    with pytest.raises(GridError, match=r"pipeline stage 'sft'.*unknown key\(s\) lrr under 'optim'; valid keys: lr, "
                                        r".*\(command line: --optim\.lrr\)"):
        run_grid(load_grid(bad), out=print)
    assert not (tmp_path / "runs").exists()


def _shipped_grids() -> list[Path]:
    import yaml

    docs = {p: yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").rglob("*.yaml"))}
    return [p for p, d in docs.items() if isinstance(d, dict) and "axes" in d]


@pytest.mark.parametrize("path", _shipped_grids() or [None], ids=lambda p: str(p.relative_to(REPO)) if p else "none")
def test_every_shipped_grid_loads_and_validates(path):
    from lvlm.ablate.runner import validate

    if path is None:
        pytest.skip("no grid shipped under configs/ yet")
    grid = load_grid(path)
    validate(grid, grid.cells())


def test_changed_mir_stage_resummarises_finished_cells(tmp_path):
    """mir_stage is not in the config hash (it does not change training), so a finished cell is not retrained
    when it changes, but its MIR is taken again from the new stage's metrics.jsonl (before: the old stage's
    MIR stayed in result.json and the report, 'skip (done)')."""
    from lvlm.ablate.runner import run_cell

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"base: {BASE}\nstages:\n  align: {{}}\n  sft: {{}}\n")

    def grid_for(stage):
        return load_grid(write_grid(tmp_path, f"axes: {{optim.lr: [0.1]}}\nmir_stage: {stage}\n", base=pipe))

    grid = grid_for("align")
    (cell,) = grid.cells()
    cell_dir, digest = grid.cell_dir(cell), grid.digest(cell)
    for name, mir in (("align", [(0, 1.0), (3, 0.5)]), ("sft", [(0, 9.0), (3, 8.0)])):
        (cell_dir / name).mkdir(parents=True)
        lines = [{"kind": "mir", "step": s, "mir": m} for s, m in mir] + [{"step": 3, "loss": 1.0}]
        (cell_dir / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    stages = [{"name": n, "run_dir": str(cell_dir / n), "done": True} for n in ("align", "sft")]
    (cell_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))
    assert run_cell(grid, cell, None, train=False, digest=digest)["mir_final"] == 0.5  # finished, no training

    def result():
        return json.loads((cell_dir / "result.json").read_text())

    out: list[str] = []
    assert run_grid(grid, out=out.append) == 0 and "skip (done)" in out[0]
    sft = grid_for("sft")
    assert sft.digest(cell) == digest
    out.clear()
    assert run_grid(sft, out=out.append) == 0
    assert "skip" not in out[0] and "MIR summarised again from stage sft" in out[0]
    r = result()
    assert (r["mir_stage"], r["mir_stage_spec"], r["mir_first"], r["mir_final"]) == ("sft", "sft", 9.0, 8.0)
    md = (tmp_path / "runs" / "results.md").read_text()
    assert "| lr=0.1 | 0.1 | 1.0000 | 9.0000 | 8.0000 | -1.0000 | - | ok |" in md and "MIR from stage sft" in md
    out.clear()
    assert run_grid(sft, out=out.append) == 0 and "skip (done)" in out[0]
    # a result.json from before mir_stage was recorded: summarised again once, then skipped
    (cell_dir / "result.json").write_text(json.dumps({k: v for k, v in r.items() if k != "mir_stage_spec"}
                                                     | {"mir_stage": "align", "mir_final": 0.5}))
    out.clear()
    assert run_grid(sft, out=out.append) == 0 and "summarised again" in out[0] and result()["mir_final"] == 8.0
    out.clear()
    assert run_grid(sft, out=out.append) == 0 and "skip (done)" in out[0]
