"""`lvlm ablate GRID.yaml [--dry-run] [--only CELL] [--report] [--dotted.key value ...]`: run an ablation grid.

A grid is a base config (or pipeline) plus axes (format: ``lvlm.ablate.grid``). Every cell's config is
loaded first, so a bad key fails before anything trains; then the cells train one after another into
RUN_DIR/<cell>/ and are scored; RUN_DIR/results.md, results.csv and mir_vs_score.png summarise them.
Finished cells are skipped when the grid is run again; failed ones are re-run (resuming their checkpoint).

  --dry-run     list the cells and the command each would run; train nothing
  --only CELL   run one cell (the report still covers every cell)
  --report      only rewrite the report from the cells' result.json files
  --key value   a dotted override applied to every cell (before the axes), e.g. --train.max_steps 50
Exit status: 0 when every cell ran ok, 1 when one failed or did not finish, 2 for a bad grid.
"""
from __future__ import annotations

import sys


def parse(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    grid, flags, rest, i = None, {"dry_run": False, "only": None, "report": False}, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--dry-run":
            flags["dry_run"] = True
        elif a == "--report":
            flags["report"] = True
        elif a == "--only" or a.startswith("--only="):
            if "=" in a:
                flags["only"] = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                flags["only"], i = argv[i + 1], i + 1
            else:
                raise ValueError("--only needs a cell name")
        elif grid is None and not a.startswith("-"):
            grid = a
        else:
            rest.append(a)
        i += 1
    return grid, flags, rest


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from lvlm.ablate import GridError, load_grid, run_grid, write_report

    try:
        path, flags, extra = parse(argv)
        if path is None:
            raise ValueError("give the grid file: lvlm ablate GRID.yaml")
        grid = load_grid(path, extra)
        if flags["report"]:
            print(write_report(grid, grid.cells()))
            return 0
        return run_grid(grid, only=flags["only"], dry_run=flags["dry_run"])
    except (GridError, ValueError) as e:
        print(f"lvlm ablate: {e}", file=sys.stderr)
        return 2
