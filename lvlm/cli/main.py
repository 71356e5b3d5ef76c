"""`lvlm` console script: dispatches to subcommands (train, mir, data, export, info)."""
from __future__ import annotations

import sys

USAGE = """usage: lvlm <command> [args]

commands:
  train [CONFIG.yaml] [--dotted.key value ...]   pre-train an LVLM (no arguments: the embedded toy default)
  mir --checkpoint RUN_DIR_OR_CHECKPOINT [--mir.key value ...]   MIR of a trained checkpoint
  data convert --format FORMAT --input PATH --out DIR [...] | data verify DIR   convert data to tar shards / check them
  data inspect RECIPE.yaml [--samples N] [--json PATH]   counts, shares, lengths, padding waste, skips of a recipe
  export hf RUN_DIR_OR_CHECKPOINT OUT_DIR   write a trained checkpoint as a transformers LlavaForConditionalGeneration
  info [CONFIG.yaml] [--world-size N] [--dotted.key value ...]   versions, devices, DeepSpeed ops; with a config:
                                            parameters and ZeRO memory per GPU
  eval toy-vqa RUN_DIR_OR_CHECKPOINT [--questions PATH] [--limit N]   toy downstream benchmark (exact match)
  ablate GRID.yaml [--dry-run] [--only CELL] [--dotted.key value ...]   run an ablation grid (base + axes)

`lvlm <command> --help` shows a command's options."""


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N``, which the deepspeed launcher inserts (the rank
    is also in the LOCAL_RANK environment variable, which is what lvlm reads)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from lvlm.cli.train import main as train_main

        return train_main(rest)
    if command == "mir":
        from lvlm.cli.mir import main as mir_main

        return mir_main(rest)
    if command == "data":
        from lvlm.cli.data import main as data_main

        return data_main(rest)
    if command == "export":
        from lvlm.cli.export import main as export_main

        return export_main(rest)
    if command == "info":
        from lvlm.cli.info import main as info_main

        return info_main(rest)
    if command == "ablate":
        return __import__("lvlm.cli.ablate", fromlist=["main"]).main(rest)
    if command == "eval":
        return __import__("lvlm.cli.eval", fromlist=["main"]).main(rest)
    print(f"lvlm: unknown command {command!r}; valid commands: train, mir, data, export, info, ablate, eval\n\n{USAGE}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
