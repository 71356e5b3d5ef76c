"""Ablation grids: parse and validate a grid YAML, expand it into named cells.

Grid format (paths relative to the grid file, except ``run_dir``, which like a config's
``run_dir`` is relative to the working directory)::

    paper: "MIR (Huang et al. 2024), Table 3: training recipe"   # free text, printed in the report
    base: ../llava15/stage1_pretrain.yaml    # a config or pipeline YAML (top-level `stages:`)
    run_dir: runs/ablate/mir_lr              # cell NAME runs in RUN_DIR/NAME/
    overrides: {train.max_steps: 300}        # optional, applied to every cell (dotted keys)
    axes:                                    # product over axes, first axis varies slowest
      optim.lr: [1.0e-3, 5.0e-4, 3.0e-4]     # a dotted key -> list of values
      unlock:                                # a named axis -> {label: {dotted key: value, ...}}
        projector: {stage.train_llm: false}
        lora: {stage.train_llm: true, stage.lora.r: 64}
    mode: product                            # product (default) | zip (axes of one length, zipped)
    score: {type: toy_vqa, stage: sft, limit: 0}   # toy_vqa | none (default); stage: pipeline stage
    mir_stage: align                         # pipeline stage whose MIR is reported (default: first with MIR)
    launcher: ""                             # "" = `python -m lvlm train`; else a command prefix

Nested mappings in ``overrides`` and in named-axis settings are flattened to dotted keys. With a
pipeline base, ``stages.NAME.key`` addresses one stage and a plain key every stage. A cell's name
joins ``axis=label`` with ``__`` (``lr=1e-3__unlock=lora``): a dotted-key axis is named by the
shortest unique tail of its key, floats are written compactly (``5e-4``), anything outside
``[A-Za-z0-9._+-]`` becomes ``-``. ``run_dir`` may not be set by the grid: the runner owns it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lvlm.ablate.values import flatten, label, number, safe, short_names, to_args

TOP_KEYS = ("paper", "base", "run_dir", "overrides", "axes", "mode", "score", "mir_stage", "launcher")
MODES = ("product", "zip")
SCORE_TYPES = ("toy_vqa", "none")
SCORE_KEYS = ("type", "stage", "limit", "questions")
MAX_NAME = 120


class GridError(ValueError):
    """A grid the runner refuses, with the reason and the valid choices."""


@dataclass(frozen=True)
class Axis:
    key: str                              # the dotted key, or the name of a named axis
    short: str                            # how the axis appears in cell names
    labels: tuple[str, ...]               # one label per value
    settings: tuple[dict[str, Any], ...]  # one {dotted key: value} per value
    named: bool = False


@dataclass(frozen=True)
class Score:
    type: str = "none"
    stage: str | None = None
    limit: int = 0
    questions: str | None = None


@dataclass
class Cell:
    name: str
    values: dict[str, str]      # axis key -> label
    settings: dict[str, Any]    # every dotted key this cell sets (grid overrides, CLI extras, axes)
    args: list[str] = field(default_factory=list)  # the same as `--key value` arguments (no --run_dir)


@dataclass
class Grid:
    path: Path
    base: Path                  # resolved against the grid file's folder
    base_as_written: str
    run_dir: Path
    axes: list[Axis]
    paper: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # `lvlm ablate GRID --key value` overrides
    mode: str = "product"
    score: Score = field(default_factory=Score)
    mir_stage: str | None = None
    launcher: str = ""
    stages: list[str] = field(default_factory=list)      # pipeline stage names; [] for a plain config

    @property
    def is_pipeline(self) -> bool:
        return bool(self.stages)

    def cell_dir(self, cell: Cell) -> Path:
        return self.run_dir / cell.name

    def digest(self, cell: Cell) -> str:
        """Identifies what a cell trains and measures: its config(s) as loaded (the base file's content and
        everything it inherits, plus the cell's overrides), less the recording-only keys
        (``lvlm.train.rundir.RECORDING_ONLY``: run_dir, resume, track, ...). Editing the base changes it.
        Loading is the check too: ConfigError if the cell's config does not load (``runner.validate``)."""
        from lvlm.config import load_config
        from lvlm.config.pipeline import load_pipeline
        from lvlm.train.rundir import RECORDING_ONLY, config_view

        args = [*cell.args, "--run_dir", str(self.cell_dir(cell))]
        if self.is_pipeline:
            stages = load_pipeline(self.base, args).stages
            view: Any = [[name, config_view(cfg, RECORDING_ONLY)] for name, cfg in stages]
        else:
            view = config_view(load_config(self.base, args), RECORDING_ONLY)
        return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cells(self) -> list[Cell]:
        if self.mode == "zip":
            combos = [tuple(i for _ in self.axes) for i in range(len(self.axes[0].labels))]
        else:
            combos = list(itertools.product(*(range(len(a.labels)) for a in self.axes)))
        cells = []
        for combo in combos:
            settings = {**self.overrides, **self.extra}
            for axis, i in zip(self.axes, combo):
                settings.update(axis.settings[i])
            values = {a.key: a.labels[i] for a, i in zip(self.axes, combo)}
            name = "__".join(f"{a.short}={safe(a.labels[i])}" for a, i in zip(self.axes, combo))
            if len(name) > MAX_NAME:
                name = name[:MAX_NAME - 10] + "__" + hashlib.sha1(name.encode()).hexdigest()[:8]
            cells.append(Cell(name, values, settings, to_args(settings)))
        seen: dict[str, list[dict]] = {}
        for c in cells:
            seen.setdefault(c.name, []).append(c.values)
        clashes = {n: v for n, v in seen.items() if len(v) > 1}
        if clashes:
            raise GridError(f"{self.path}: cells {clashes} get the same name; give distinct values "
                            "or use a named axis with distinct labels")
        return cells


def parse_extra(args: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs (the overrides given after the grid on the command line)."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise GridError(f"expected --dotted.key value, got {a!r}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            k, v = a[2:], args[i + 1]
            i += 2
        else:
            raise GridError(f"override {a} has no value")
        out[k] = v
    return out


def _parse_axes(axes: Any, where: str) -> list[Axis]:
    if not isinstance(axes, dict) or not axes:
        raise GridError(f"{where}: 'axes' is empty or not a mapping: give at least one axis, "
                        "either `dotted.key: [v1, v2]` or `name: {label: {dotted.key: value}}`")
    shorts = dict(zip(axes, short_names([str(k) for k in axes])))
    out = []
    for key, vals in axes.items():
        key = str(key)
        if isinstance(vals, dict):
            if not vals:
                raise GridError(f"{where}: axis '{key}' has no labels")
            labels, settings = [], []
            for lab, sets in vals.items():
                if sets is None:
                    sets = {}
                if not isinstance(sets, dict):
                    raise GridError(f"{where}: axis '{key}', label '{lab}': expected a mapping of dotted keys "
                                    f"to values (e.g. {{stage.train_llm: true}}), got {sets!r}")
                labels.append(str(lab))
                settings.append(flatten(sets))
            out.append(Axis(key, shorts[key], tuple(labels), tuple(settings), named=True))
        elif isinstance(vals, list):
            if not vals:
                raise GridError(f"{where}: axis '{key}' has an empty list of values")
            vals = [number(v) for v in vals]
            out.append(Axis(key, shorts[key], tuple(label(v) for v in vals), tuple({key: v} for v in vals)))
        else:
            raise GridError(f"{where}: axis '{key}' must be a list of values or a mapping "
                            f"{{label: {{dotted.key: value}}}}, got {vals!r}")
    return out


def _pipeline_stages(base: Path) -> list[str]:
    doc = yaml.safe_load(base.read_text()) or {}
    stages = doc.get("stages") if isinstance(doc, dict) else None
    return [str(s) for s in stages] if isinstance(stages, dict) else []


def _parse_score(raw: Any, where: str) -> Score:
    if raw is None:
        return Score()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise GridError(f"{where}: 'score' must be a mapping like {{type: toy_vqa, stage: sft, limit: 0}}")
    unknown = sorted(set(raw) - set(SCORE_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown} under 'score'; valid keys: {', '.join(SCORE_KEYS)}")
    kind = str(raw.get("type", "none")).lower()
    if kind not in SCORE_TYPES:
        raise GridError(f"{where}: invalid score type {raw.get('type')!r}; valid choices: {', '.join(SCORE_TYPES)}")
    limit = raw.get("limit", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise GridError(f"{where}: score.limit must be an integer >= 0 (0 = every question), got {limit!r}")
    stage = raw.get("stage")
    return Score(kind, None if stage is None else str(stage), limit, raw.get("questions"))


def load_grid(path: str | Path, extra: list[str] | None = None) -> Grid:
    """Parse and check a grid file (not yet the cells' configs: see ``runner.validate``)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    doc = yaml.safe_load(path.read_text())
    where = str(path)
    if not isinstance(doc, dict):
        raise GridError(f"{where}: a grid is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown top-level key(s) {unknown}; valid keys: {', '.join(TOP_KEYS)}")
    for key in ("base", "run_dir"):
        if not doc.get(key) or not isinstance(doc[key], str):
            raise GridError(f"{where}: '{key}' is required (a path)")
    base = path.parent / doc["base"]
    if not base.is_file():
        raise GridError(f"{where}: base config not found: {base} ('base' is relative to the grid file)")
    mode = str(doc.get("mode", "product"))
    if mode not in MODES:
        raise GridError(f"{where}: invalid mode {mode!r}; valid choices: {', '.join(MODES)}")
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise GridError(f"{where}: 'overrides' must be a mapping of dotted keys to values")
    axes = _parse_axes(doc.get("axes"), where)
    if mode == "zip" and len({len(a.labels) for a in axes}) > 1:
        sizes = ", ".join(f"{a.key}: {len(a.labels)}" for a in axes)
        raise GridError(f"{where}: mode zip needs axes of one length, got {sizes}")
    grid = Grid(path=path, base=base, base_as_written=doc["base"], run_dir=Path(doc["run_dir"]), axes=axes,
                paper=str(doc.get("paper") or ""), overrides=flatten(overrides), extra=parse_extra(extra or []),
                mode=mode, score=_parse_score(doc.get("score"), where),
                mir_stage=None if doc.get("mir_stage") is None else str(doc["mir_stage"]),
                launcher=str(doc.get("launcher") or ""), stages=_pipeline_stages(base))
    _check_keys(grid, where)
    grid.cells()  # names must be unique
    return grid


def _check_keys(grid: Grid, where: str) -> None:
    owners: dict[str, str] = {}
    for axis in grid.axes:
        for key in {k for s in axis.settings for k in s}:
            if key in owners and owners[key] != axis.key:
                raise GridError(f"{where}: axes '{owners[key]}' and '{axis.key}' both set '{key}'")
            owners[key] = axis.key
    clash = sorted(set(grid.extra) & set(owners))
    if clash:
        raise GridError(f"command-line override(s) {clash} are also grid axes; drop them or edit the axis")
    every = {**grid.overrides, **grid.extra, **owners}
    if "run_dir" in every:
        raise GridError(f"{where}: run_dir is set per cell by the runner (RUN_DIR/<cell>); set the grid's "
                        "top-level run_dir instead")
    for key in every:
        if key.startswith("stages."):
            name = key.split(".")[1] if key.count(".") >= 2 else ""
            if not grid.is_pipeline:
                raise GridError(f"{where}: '{key}' addresses a pipeline stage but base {grid.base} is a plain "
                                "config (no top-level `stages:`)")
            if name not in grid.stages:
                raise GridError(f"{where}: '{key}': unknown stage {name!r}; stages: {', '.join(grid.stages)}")
    for what, stage in (("score.stage", grid.score.stage), ("mir_stage", grid.mir_stage)):
        if stage is None:
            continue
        if not grid.is_pipeline:
            raise GridError(f"{where}: {what} {stage!r} needs a pipeline base; {grid.base} is a plain config")
        if stage not in grid.stages:
            raise GridError(f"{where}: invalid {what} {stage!r}; valid choices: {', '.join(grid.stages)}")
