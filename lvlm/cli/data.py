"""`lvlm data convert|verify|inspect`: convert a data format to lvlm tar shards, check shards, inspect a config.

  lvlm data convert --format FORMAT --input PATH [--input PATH ...] --out DIR
                    [--image-folder DIR] [--image-position before|after] [--max-images N]
                    [--field NAME] [--drop-prompt] [--text-as-txt]
                    [--samples-per-shard N] [--prefix data] [--overwrite]
  lvlm data verify DIR
  lvlm data inspect [CONFIG.yaml] [--samples N] [--json PATH] [--dotted.key value ...]

FORMAT is one of: llava_json, webdataset, interleaved-webdataset, mmc4, obelics, text-jsonl,
text-webdataset, text-parquet. The source is built from its config class in lvlm.config.schema and
read for ONE epoch in its stream order for seed 0; lvlm.data.convert writes the shards and the
manifest. Several --input values (or '::'-separated paths) are joined into one file list.
llava_json keeps the human turns as user text (conversations keep their roles) unless
--drop-prompt is given (LLaVA stage-1 "plain": image + caption only, written as caption pairs).
--field is the text field of text-* formats, or the caption key of webdataset (default txt).
Problems in the input (missing or corrupt images, bad records) are skipped and counted.

inspect loads a config (e.g. a data_recipes/*.yaml data block; toy:// assets built if needed), reads the
first N (default 2000) samples of its global training stream the way training does, and prints per-source
sample/token shares against the weights, the modality mix, a token-length histogram, padding waste with and
without packing at train.micro_batch_size, and skipped samples by reason (lvlm.data.inspect).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Iterator, Optional

from lvlm.data.sample import Sample
from lvlm.data.skips import SkipCounter

INTERLEAVED_FORMATS = {"interleaved-webdataset": "webdataset", "mmc4": "mmc4", "obelics": "obelics"}
TEXT_FORMATS = {"text-jsonl": "jsonl", "text-webdataset": "webdataset", "text-parquet": "parquet"}
FORMATS: tuple[str, ...] = ("llava_json", "webdataset", *INTERLEAVED_FORMATS, *TEXT_FORMATS)
NEEDS_IMAGE_FOLDER = ("llava_json", "mmc4")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvlm data convert", add_help=True)
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--input", required=True, action="append", help="input file/shard pattern (repeatable)")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--image-position", default=None, choices=("before", "after"))
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--field", default=None)
    p.add_argument("--drop-prompt", action="store_true", help="llava_json: keep only the gpt turns")
    p.add_argument("--text-as-txt", action="store_true", help="write single-text samples as KEY.txt")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="data")
    p.add_argument("--overwrite", action="store_true")
    return p


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def _split_inputs(inputs: list[str]) -> list[str]:
    """Absolute local paths (patterns kept), remote URLs as given."""
    paths = [p.strip() for item in inputs for p in item.split("::") if p.strip()]
    return [os.path.abspath(p) if _is_local(p) else p for p in paths]


def _check_inputs(paths: list[str]) -> None:
    import braceexpand

    for path in paths:
        if _is_local(path) and not any(os.path.exists(p) for p in braceexpand.braceexpand(path)):
            raise _UsageError(f"input not found: {path!r}")


def _files_value(cls: type, paths: list[str]) -> Any:
    """The ``files`` field as the config class declares it: a list, or one '::'-joined string."""
    declared = {f.name: str(f.type) for f in dataclasses.fields(cls)}.get("files", "str")
    return list(paths) if "list" in declared.lower() else "::".join(paths)


def _config_record(cfg: Any) -> dict[str, Any]:
    return {"class": type(cfg).__name__, **dataclasses.asdict(cfg)}


def _build(args: argparse.Namespace, paths: list[str]) -> tuple[Any, dict[str, Any]]:
    """(source, config record) for the parsed arguments."""
    from lvlm.data.sources import build_source

    fmt = args.format
    folder = os.path.abspath(args.image_folder) if args.image_folder else None
    if fmt in NEEDS_IMAGE_FOLDER and not folder:
        raise _UsageError(f"--format {fmt} needs --image-folder (the directory the records' images are in)")
    if folder and not os.path.isdir(folder):
        raise _UsageError(f"image folder not found: {args.image_folder!r}")
    if fmt == "llava_json":
        from lvlm.config.schema import LLaVAJsonSourceConfig
        from lvlm.data.sources.llava_json import LLaVAJsonSource

        if len(paths) != 1:
            raise _UsageError(f"--format llava_json takes exactly one JSON file, got {len(paths)} inputs")
        cfg = LLaVAJsonSourceConfig(json_path=paths[0], image_folder=folder or "")
        source = LLaVAJsonSource(cfg.json_path, cfg.image_folder, drop_prompt=args.drop_prompt, name="llava_json")
        return source, {**_config_record(cfg), "drop_prompt": args.drop_prompt}
    if fmt == "webdataset":
        from lvlm.config.schema import WebDatasetSourceConfig

        cfg = WebDatasetSourceConfig(shards="::".join(paths), caption_key=args.field or "txt")
        return build_source(cfg), _config_record(cfg)
    kwargs: dict[str, Any]
    if fmt in INTERLEAVED_FORMATS:
        try:
            from lvlm.config.schema import InterleavedSourceConfig as cls
        except ImportError as err:
            raise _UsageError(f"--format {fmt} needs InterleavedSourceConfig, missing from this lvlm") from err
        kwargs = {"format": INTERLEAVED_FORMATS[fmt], "files": _files_value(cls, paths)}
        optional = {"image_folder": folder, "image_position": args.image_position, "max_images": args.max_images}
    else:
        try:
            from lvlm.config.schema import TextSourceConfig as cls
        except ImportError as err:
            raise _UsageError(f"--format {fmt} needs TextSourceConfig, missing from this lvlm") from err
        kwargs = {"format": TEXT_FORMATS[fmt], "files": _files_value(cls, paths)}
        optional = {"field": args.field}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    cfg = cls(**kwargs)
    return build_source(cfg), _config_record(cfg)


def load_stream(source: Any, skips: SkipCounter) -> Iterator[Sample]:
    """One epoch (seed 0) in stream order; a sample whose files cannot be read is counted, not fatal."""
    if not hasattr(source, "iter_refs"):
        yield from source.iter_samples(seed=0, epoch=0, skips=skips)
        return
    for ref in source.iter_refs(seed=0, epoch=0, skips=skips):
        try:
            sample = ref.load()
        except OSError:
            skips.add("unreadable_image")
            continue
        except ValueError:
            skips.add("unreadable_sample")
            continue
        yield sample


def _convert(argv: list[str]) -> int:
    from lvlm.data.convert import MANIFEST_NAME, convert

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.format not in FORMATS:
            raise _UsageError(f"unknown --format {args.format!r}; valid formats: {', '.join(FORMATS)}")
        if args.samples_per_shard < 1:
            raise _UsageError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
        paths = _split_inputs(args.input)
        _check_inputs(paths)
        source, cfg_record = _build(args, paths)
    except (_UsageError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"lvlm data convert: {err}", file=sys.stderr)
        return 2
    params = {
        "format": args.format,
        "inputs": paths,
        "source_config": cfg_record,
        "options": {"samples_per_shard": args.samples_per_shard, "prefix": args.prefix,
                    "text_as_txt": args.text_as_txt, "seed": 0, "epoch": 0},
    }
    skips = SkipCounter()
    try:
        manifest = convert(load_stream(source, skips), args.out, samples_per_shard=args.samples_per_shard,
                           prefix=args.prefix, params=params, skips=skips, text_as_txt=args.text_as_txt,
                           overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"lvlm data convert: {err}", file=sys.stderr)
        return 2
    t, k = manifest.totals, manifest.kinds
    skipped = ", ".join(f"{r}={n}" for r, n in manifest.skips.items()) or "none"
    print(f"converted {t['samples']} samples (caption {k['caption']}, document {k['document']}, text {k['text']}; "
          f"{t['images']} images) into {t['shards']} shards, {t['bytes']} bytes: {args.out}\n"
          f"skipped {sum(manifest.skips.values())}: {skipped}\n"
          f"manifest: {os.path.join(args.out, MANIFEST_NAME)}")
    return 0


def _verify(argv: list[str]) -> int:
    from lvlm.data.convert import MANIFEST_NAME, load_manifest, verify

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: lvlm data verify DIR", file=sys.stderr)
        return 2
    try:
        problems = verify(argv[0])
        shards = len(load_manifest(argv[0]).shards)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        print(f"lvlm data verify: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {argv[0]}", file=sys.stderr)
        return 1
    print(f"OK: {shards} shards match {os.path.join(argv[0], MANIFEST_NAME)}")
    return 0


def _take_option(args: list[str], name: str) -> Optional[str]:
    """Remove ``name VALUE`` / ``name=VALUE`` from ``args``; the value, or None when absent."""
    for i, a in enumerate(args):
        if a == name:
            if i + 1 >= len(args):
                raise _UsageError(f"{name} needs a value")
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def _inspect(argv: list[str]) -> int:
    from lvlm.cli.train import split_args
    from lvlm.config import ConfigError, load_config

    if "-h" in argv or "--help" in argv:
        print("usage: lvlm data inspect [CONFIG.yaml] [--samples N] [--json PATH] [--dotted.key value ...]")
        return 0
    try:
        rest = list(argv)
        samples = _take_option(rest, "--samples")
        json_path = _take_option(rest, "--json")
        path, rest = split_args(rest)
        num = int(samples) if samples is not None else 2000
        if num < 1:
            raise _UsageError(f"--samples must be >= 1, got {num}")
        cfg = load_config(path, rest)
    except (_UsageError, ConfigError, ValueError) as err:
        print(f"lvlm data inspect: {err}", file=sys.stderr)
        return 2
    import logging

    from lvlm import toy
    from lvlm.data.inspect import data_spec_for, format_report, inspect_data

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # toy-asset build progress

    try:
        cfg = toy.resolve_config(cfg)
        report = inspect_data(cfg.data, data_spec_for(cfg.model), num_samples=num,
                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                              resolve_path=toy.resolve)  # also mixture entries (a dict resolve_config skips)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"lvlm data inspect: {err}", file=sys.stderr)
        return 2
    print(format_report(report, path or "<default config>", cfg.data.max_skip_fraction))
    if json_path:
        import json

        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"json: {json_path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "convert":
        return _convert(rest)
    if command == "verify":
        return _verify(rest)
    if command == "inspect":
        return _inspect(rest)
    print(f"lvlm data: unknown subcommand {command!r}; valid: convert, verify, inspect", file=sys.stderr)
    return 2
