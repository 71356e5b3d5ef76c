"""Writing a stream of ``Sample`` objects to deterministic tar shards plus a ``manifest.json``.

Owns the on-disk shard layouts shared with the readers, the manifest schema and ``verify``:

* caption pair (exactly ``[ImageSegment, TextSegment(assistant)]``): img2dataset layout,
  ``KEY.<ext>`` (original encoded bytes; ext jpg/png/webp from the real format) then ``KEY.txt``;
* anything else (interleaved document, conversation with roles, text-only): document layout,
  ``KEY.json`` = ``{"segments": [{"type": "text", "text", "role"} | {"type": "image", "member"}],
  "meta": {...}}`` then one member ``KEY.img<i>.<ext>`` per image, ``member`` being the name after
  ``KEY.``; with ``text_as_txt`` a sample that is one assistant text becomes ``KEY.txt``.

KEYs are the running index ``%09d`` of the written samples; shards are ``{prefix}-{n:06d}.tar``.
Shards are byte-identical for the same input (mtime/uid/gid 0, fixed member order, no
timestamps anywhere) and each is written to a ``.tmp`` name and renamed when complete; the
manifest is written last. Images are only header-checked (``PIL.Image.open`` + ``verify``), not
fully decoded; an unidentifiable image skips its sample as ``corrupt_image`` and a format other
than JPEG/PNG/WebP (or an in-memory PIL image) is re-encoded losslessly to PNG. The document JSON
``meta`` is ``{"source", "source_key", **Sample.meta}`` with input paths cut to their base name, so
shards do not depend on where the input lives (the manifest's ``params`` do record the paths).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Union

from PIL import Image

from lvlm import __version__
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
"""PIL format -> member extension of images whose bytes are kept as they are."""
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_LOCATION_KEYS = {"image_path", "shard", "file"}
"""``Sample.meta`` keys the sources fill with input paths; the document JSON keeps only their base name."""


@dataclass
class ShardInfo:
    """One shard's entry in the manifest."""

    name: str
    num_samples: int
    num_images: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What ``manifest.json`` holds (``to_dict`` is the file's exact content)."""

    shards: list[ShardInfo] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    """samples, images, text_chars, shards, bytes, reencoded_images."""
    kinds: dict[str, int] = field(default_factory=dict)
    """caption / document / text sample counts (by content, whatever the layout)."""
    params: dict[str, Any] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)
    prefix: str = "data"
    samples_per_shard: int = 1000
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        shards = [ShardInfo(**s) for s in data.get("shards", [])]
        return cls(**{**data, "shards": shards})


class _BadImage(Exception):
    pass


def _encode_image(data: Union[bytes, Image.Image]) -> tuple[bytes, str, bool]:
    """(bytes to store, extension, re-encoded?) for one image; raises ``_BadImage``."""
    try:
        if isinstance(data, Image.Image):
            image, fmt = data, None
        else:
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                probe.verify()
            if fmt in _KEEP_FORMATS:
                return bytes(data), _KEEP_FORMATS[fmt], False
            image = Image.open(io.BytesIO(data))
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), "png", True
    except Exception as err:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, ...)
        raise _BadImage(str(err)) from err


def _kind(sample: Sample) -> str:
    segs = sample.segments
    if (len(segs) == 2 and isinstance(segs[0], ImageSegment) and isinstance(segs[1], TextSegment)
            and segs[1].role == "assistant"):
        return "caption"
    return "text" if sample.num_images == 0 else "document"


def _members(sample: Sample, key: str, kind: str, text_as_txt: bool) -> tuple[list[tuple[str, bytes]], int]:
    """The (name, bytes) tar members of one sample in layout order, and how many images were re-encoded."""
    if kind == "caption":
        data, ext, reenc = _encode_image(sample.segments[0].data)
        return [(f"{key}.{ext}", data), (f"{key}.txt", sample.segments[1].text.encode("utf-8"))], int(reenc)
    segs = sample.segments
    if kind == "text" and text_as_txt and len(segs) == 1 and segs[0].role == "assistant":
        return [(f"{key}.txt", segs[0].text.encode("utf-8"))], 0
    doc_segments: list[dict[str, str]] = []
    images: list[tuple[str, bytes]] = []
    reencoded = 0
    for seg in segs:
        if isinstance(seg, TextSegment):
            doc_segments.append({"type": "text", "text": seg.text, "role": seg.role})
        else:
            data, ext, reenc = _encode_image(seg.data)
            member = f"img{len(images)}.{ext}"
            doc_segments.append({"type": "image", "member": member})
            images.append((f"{key}.{member}", data))
            reencoded += int(reenc)
    meta: dict[str, Any] = {"source": sample.source, "source_key": sample.key}
    for name, value in sample.meta.items():  # location keys keep their base name: shards do not depend on paths
        meta[name] = os.path.basename(value) if name in _LOCATION_KEYS and isinstance(value, str) else value
    doc = json.dumps({"segments": doc_segments, "meta": meta}, ensure_ascii=False, default=str)
    return [(f"{key}.json", doc.encode("utf-8")), *images], reencoded


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class _ShardWriter:
    """One shard being written to ``<name>.tmp``; ``close`` renames it and returns its ``ShardInfo``."""

    def __init__(self, out_dir: str, name: str) -> None:
        self.name, self.path = name, os.path.join(out_dir, name)
        self.file = open(self.path + ".tmp", "wb")
        self.hasher = _HashingWriter(self.file)
        self.tar = tarfile.open(fileobj=self.hasher, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = self.num_images = 0

    def add(self, members: list[tuple[str, bytes]], num_images: int) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1
        self.num_images += num_images

    def close(self) -> ShardInfo:
        self.tar.close()
        self.file.close()
        os.replace(self.path + ".tmp", self.path)
        return ShardInfo(self.name, self.num_samples, self.num_images, self.hasher.size, self.hasher.sha.hexdigest())


def _prepare_out_dir(out_dir: str, prefix: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"output directory {out_dir!r} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    # Remove only what a conversion writes: the manifest, its shards, our shard names and partials.
    ours = {MANIFEST_NAME}
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                ours.update(s["name"] for s in json.load(f).get("shards", []))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
    for entry in entries:
        path = os.path.join(out_dir, entry)
        if (entry in ours or pattern.match(entry)) and os.path.isfile(path):
            os.remove(path)


def convert(
    samples: Iterable[Sample],
    out_dir: str,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "data",
    params: Optional[dict[str, Any]] = None,
    skips: Optional[SkipCounter] = None,
    text_as_txt: bool = False,
    overwrite: bool = False,
) -> Manifest:
    """Write ``samples`` as shards under ``out_dir`` (layouts in the module docstring) and return the manifest.

    ``skips`` should be the counter the source counts into: it is completed here (``corrupt_image``,
    ``empty_sample``) and its final snapshot goes into the manifest.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
    skips = skips if skips is not None else SkipCounter()
    _prepare_out_dir(out_dir, prefix, overwrite)
    manifest = Manifest(prefix=prefix, samples_per_shard=samples_per_shard,
                        params={**(params or {}), "lvlm_version": __version__})
    kinds = {"caption": 0, "document": 0, "text": 0}
    text_chars = reencoded = written = 0
    writer: Optional[_ShardWriter] = None
    try:
        for sample in samples:
            if not sample.segments:
                skips.add("empty_sample")
                continue
            kind, key = _kind(sample), f"{written:09d}"
            try:
                members, reenc = _members(sample, key, kind, text_as_txt)
            except _BadImage:
                skips.add("corrupt_image")
                continue
            if writer is None:
                writer = _ShardWriter(out_dir, f"{prefix}-{len(manifest.shards):06d}.tar")
            writer.add(members, sample.num_images)
            written += 1
            kinds[kind] += 1
            reencoded += reenc
            text_chars += sum(len(s.text) for s in sample.segments if isinstance(s, TextSegment))
            if writer.num_samples >= samples_per_shard:
                manifest.shards.append(writer.close())
                writer = None
        if writer is not None:
            manifest.shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:  # an exception escaped: leave no half shard behind under a final name
            writer.tar.close()
            writer.file.close()
            os.remove(writer.path + ".tmp")
    manifest.kinds = kinds
    manifest.totals = {"samples": written, "images": sum(s.num_images for s in manifest.shards),
                       "text_chars": text_chars, "shards": len(manifest.shards),
                       "bytes": sum(s.bytes for s in manifest.shards), "reencoded_images": reencoded}
    manifest.skips = skips.as_dict()
    tmp = os.path.join(out_dir, MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST_NAME))
    return manifest


def load_manifest(out_dir: str) -> Manifest:
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir!r}; is it a converted shard directory?")
    with open(path, encoding="utf-8") as f:
        return Manifest.from_dict(json.load(f))


def verify(out_dir: str) -> list[str]:
    """Recompute bytes and sha256 of every shard against the manifest; one line per mismatch
    (missing shard, size or hash differs, a ``.tar`` in the directory that the manifest does not list)."""
    manifest = load_manifest(out_dir)
    problems: list[str] = []
    for shard in manifest.shards:
        path = os.path.join(out_dir, shard.name)
        if not os.path.isfile(path):
            problems.append(f"{shard.name}: missing")
            continue
        sha, size = hashlib.sha256(), os.path.getsize(path)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        if size != shard.bytes:
            problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
        if digest != shard.sha256:
            problems.append(f"{shard.name}: sha256 {digest}, manifest says {shard.sha256}")
    listed = {s.name for s in manifest.shards}
    for entry in sorted(os.listdir(out_dir)):
        if entry.endswith(".tar") and entry not in listed:
            problems.append(f"{entry}: not listed in the manifest")
    return problems


__all__ = ["MANIFEST_NAME", "Manifest", "ShardInfo", "convert", "load_manifest", "verify"]
