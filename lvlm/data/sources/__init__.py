"""Data sources (caption, interleaved and text): the shared interface and ``build_source``
(config class -> source).

A source owns one data format and one thing only: the deterministic order of one epoch. For a
given ``(seed, epoch)`` it yields the same ``SampleRef`` sequence in every process (every rank,
every data-loader worker), so the global sample stream can be split by index without any
communication. A ``SampleRef`` is cheap: validity checks that decide whether a sample exists at
all (image present, caption non-empty) happen while producing it, but expensive work (reading an
image file, building the ``Sample``) waits for ``ref.load()``. Skipping a sample that belongs to
another rank or worker is therefore just dropping its ref.

Assumes every process sees the same files: the order contract holds only if all readers find
the same shards/records valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

from lvlm.config.schema import (
    LLAVA_FORMATS,
    InterleavedSourceConfig,
    LLaVAJsonSourceConfig,
    SourceConfig,
    TextSourceConfig,
    WebDatasetSourceConfig,
)
from lvlm.data.sample import Sample
from lvlm.data.skips import SkipCounter

@dataclass(frozen=True)
class SampleRef:
    """A sample that exists in the epoch but has not been materialised yet."""

    key: str
    loader: Callable[[], Sample]
    """Builds the ``Sample``; may raise ``OSError`` (e.g. an image file vanished)."""

    def load(self) -> Sample:
        return self.loader()


@runtime_checkable
class CaptionSource(Protocol):
    """What every source offers; see the module docstring for the ordering contract."""

    name: str

    def iter_refs(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[SampleRef]:
        """The valid samples of one epoch, in the deterministic order for ``(seed, epoch)``;
        invalid ones are counted in ``skips`` by reason and not yielded."""
        ...

    def iter_samples(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[Sample]:
        """``iter_refs`` with every ref loaded (convenience for inspection and tests)."""
        ...


def resolve_toy_free(path: str) -> str:
    """Default path resolver: refuses ``toy://`` paths, which ``lvlm.toy`` must resolve first."""
    if path.startswith("toy://"):
        raise ValueError(
            f"data path {path!r} names an embedded toy asset; resolve it with lvlm.toy before "
            "building the source (pass resolve_path=...)"
        )
    return path


def check_choice(option: str, value: str, valid: Sequence[str], kind: str) -> None:
    """Refuse a string option outside ``valid`` with a message naming the value and the choices."""
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{option}={value!r} is not valid for {kind} source; choose one of {choices}")


def _resolve_files(files: str, resolve: Callable[[str], str]) -> str:
    return "::".join(resolve(p.strip()) for p in files.split("::") if p.strip())


def build_source(
    cfg: SourceConfig,
    *,
    resolve_path: Optional[Callable[[str], str]] = None,
    name: Optional[str] = None,
) -> CaptionSource:
    """Build the source a config describes.

    ``resolve_path`` maps each configured path (after '::' splitting, before brace expansion)
    to a real path; by default ``toy://`` paths are refused with a clear error.
    """
    resolve = resolve_path or resolve_toy_free
    if isinstance(cfg, WebDatasetSourceConfig):
        from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource

        shards = "::".join(resolve(p) for p in cfg.shards.split("::") if p.strip())
        return WebDatasetCaptionSource(shards, caption_key=cfg.caption_key, name=name or "webdataset")
    if isinstance(cfg, LLaVAJsonSourceConfig):
        from lvlm.data.sources.llava_json import LLaVAJsonSource

        check_choice("format", cfg.format, LLAVA_FORMATS, "a llava_json")
        return LLaVAJsonSource(resolve(cfg.json_path), resolve(cfg.image_folder), drop_prompt=cfg.format == "plain",
                               name=name or "llava_json")
    if isinstance(cfg, InterleavedSourceConfig):
        from lvlm.data.sources.interleaved import IMAGE_POSITIONS, INTERLEAVED_FORMATS, InterleavedSource

        check_choice("format", cfg.format, INTERLEAVED_FORMATS, "an interleaved")
        check_choice("image_position", cfg.image_position, IMAGE_POSITIONS, "an interleaved")
        return InterleavedSource(
            _resolve_files(cfg.files, resolve),
            format=cfg.format,
            image_folder=resolve(cfg.image_folder) if cfg.image_folder else "",
            image_position=cfg.image_position,
            max_images=cfg.max_images,
            name=name or "interleaved",
        )
    if isinstance(cfg, TextSourceConfig):
        from lvlm.data.sources.text import TEXT_FORMATS, TextSource

        check_choice("format", cfg.format, TEXT_FORMATS, "a text")
        return TextSource(_resolve_files(cfg.files, resolve), format=cfg.format, field=cfg.field, name=name or "text")
    raise TypeError(
        f"unsupported source config {type(cfg).__name__}; known: WebDatasetSourceConfig, LLaVAJsonSourceConfig, "
        "InterleavedSourceConfig, TextSourceConfig"
    )


__all__ = ["SampleRef", "CaptionSource", "build_source", "check_choice", "resolve_toy_free"]
