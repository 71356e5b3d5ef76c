"""`lvlm export hf RUN_DIR_OR_CHECKPOINT OUT_DIR`: write a trained model as a transformers LLaVA.

Rebuilds the model from the run's ``config.yaml`` and the checkpoint's ``trainable.safetensors``
(frozen weights are read from the backbones the config names, so those must be available) and
writes a ``LlavaForConditionalGeneration`` directory (weights, config, tokenizer, processor) to
OUT_DIR, which must be new or empty. Exportable: an hf (CLIP/SigLIP) vision tower, a linear or
mlp (depth <= 2) connector, no MoCa. Exit 0 and list the files written; exit 2 with the reason when
the model cannot be exported or the checkpoint cannot be read.
"""
from __future__ import annotations

import sys

FORMATS = ("hf",)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) != 3 or argv[0] not in FORMATS:
        print(f"usage: lvlm export hf RUN_DIR_OR_CHECKPOINT OUT_DIR (formats: {', '.join(FORMATS)}); got {argv}",
              file=sys.stderr)
        return 2
    _, target, out_dir = argv

    from lvlm.config import ConfigError
    from lvlm.export import ExportError, export_llava

    try:
        out = export_llava(target, out_dir)
    except (ExportError, FileNotFoundError, ConfigError) as e:
        print(f"lvlm export: {e}", file=sys.stderr)
        return 2
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"wrote LlavaForConditionalGeneration to {out} ({len(files)} files):")
    for path in files:
        print(f"  {path.relative_to(out)}  ({path.stat().st_size} bytes)")
    return 0
