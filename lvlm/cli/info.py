"""`lvlm info [CONFIG.yaml] [--world-size N] [--dotted.key value ...]`.

Without a config: versions (Python, torch, CUDA, transformers, DeepSpeed, open_clip, flash-attn ...),
CUDA devices and the DeepSpeed ops that can be built / are built here. With a config (or dotted
overrides of the default config): parameters per part and trainable parameters under the config's
stage, from a weightless meta-device build, and memory per GPU for ZeRO stages 0-3 at ``--world-size``
(default 8) GPUs, activations excluded. The work is in ``lvlm.info``.
"""
from __future__ import annotations

import sys

USAGE = """usage: lvlm info [CONFIG.yaml] [--world-size N] [--dotted.key value ...]

  no config      versions, CUDA devices, DeepSpeed op compatibility
  CONFIG.yaml    parameters per part (total / trainable under the config's stage), built without weights,
                 and per-GPU memory of parameters, gradients and Adam states for ZeRO 0-3
                 (activations not included)
  --world-size N data-parallel GPUs the ZeRO partitions are divided over (default 8)"""


def _take_world_size(argv: list[str]) -> tuple[int, list[str]]:
    """Remove ``--world-size N`` / ``--world-size=N`` from ``argv``; returns (N, the rest)."""
    rest, value, i = [], "8", 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--world-size=") or a.startswith("--world_size="):
            value = a.split("=", 1)[1]
        elif a in ("--world-size", "--world_size"):
            if i + 1 >= len(argv):
                raise ValueError("--world-size needs a value")
            value, i = argv[i + 1], i + 1
        else:
            rest.append(a)
        i += 1
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--world-size must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"--world-size must be >= 1, got {n}")
    return n, rest


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    from lvlm import info

    try:
        world_size, rest = _take_world_size(list(argv))
    except ValueError as err:
        print(f"lvlm info: {err}", file=sys.stderr)
        return 2
    if not rest:
        accelerator, ops = info.deepspeed_ops()
        print(info.format_environment(info.versions(), info.devices(), accelerator, ops))
        return 0

    import logging

    from lvlm import toy
    from lvlm.cli.train import split_args
    from lvlm.config import ConfigError, load_config

    path, overrides = split_args(rest)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        print(f"lvlm info: config error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # toy-asset build progress
    try:
        cfg = toy.resolve_config(cfg)
        parts = info.model_sizes(cfg)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"lvlm info: cannot build the model of {path or '<default config>'} on the meta device: {err}",
              file=sys.stderr)
        return 2
    print(f"config: {path or '<default config>'}")
    print(info.format_model(parts, info.zero_memory(parts, world_size), cfg, world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
