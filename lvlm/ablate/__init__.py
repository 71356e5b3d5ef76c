"""Ablation grids: a base config (or pipeline) plus axes -> cells trained, scored and reported.

``grid.py`` parses and validates the grid YAML (format in its docstring) and names the cells
(``values.py``: values as command-line arguments and as cell-name labels);
``runner.py`` trains each cell as a subprocess, scores it and writes its ``result.json``;
``report.py`` writes ``results.md``, ``results.csv``, ``mir_vs_score.png`` and the Spearman
correlation of final MIR with the score. Imports nothing heavy.
"""
from lvlm.ablate.grid import Cell, Grid, GridError, load_grid
from lvlm.ablate.report import spearman, write_report
from lvlm.ablate.runner import run_grid

__all__ = ["Cell", "Grid", "GridError", "load_grid", "run_grid", "spearman", "write_report"]
