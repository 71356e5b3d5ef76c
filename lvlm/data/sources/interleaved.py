"""Interleaved image-text documents -> ``Sample([text, image, text, ...])``.

Owns three input formats and how each becomes an ordered segment list:

* ``webdataset``, the *document layout* (shared with the converter that writes it): per document
  KEY a tar holds ``KEY.json`` = ``{"segments": [{"type": "text", "text": str, "role": str?},
  {"type": "image", "member": "img0.jpg"}, ...], "meta": {...}?}`` and one member per image named
  ``KEY.<member>`` (``doc17.img0.jpg``; ``base_plus_ext`` gives key ``doc17``, ext ``img0.jpg``).
  Roles are kept (default ``assistant``); segments are kept as given (not merged). A document
  naming a member its key does not have is skipped (``missing_image``).
* ``mmc4``: jsonl, one document per line ``{"text_list": [...], "image_info": [{"image_name",
  "matched_text_index"}, ...]}``; each image goes before (or, ``image_position="after"``, after)
  its matched sentence, images matched to one sentence in ``image_info`` order. Sentences between
  images are joined with a space.
* ``obelics``: parquet with parallel list columns ``texts`` and ``images`` (per position exactly
  one non-null); consecutive paragraphs are joined with a blank line.

For mmc4/obelics, images are files under ``image_folder`` (a URL entry is looked up by its
basename); an absent file drops that image only and counts ``images_missing`` (a dropped part of a kept
document, like ``images_over_limit``: never a skipped sample, since MMC4 downloads miss many). All text is
``assistant`` there. Common rules, in this order: texts are stripped and empty ones dropped; a
document with no text left is skipped (``empty_text``); missing images are handled as above;
images beyond ``max_images`` (0 = no limit) are dropped and counted one by one
(``images_over_limit``), text kept. Malformed documents (bad JSON, wrong types, an OBELICS row not
"exactly one non-null" per position) count ``bad_document``. File-level problems and the epoch order
(file list permuted per ``(seed, epoch)``, documents in file order) are ``DocumentFileSource``'s.
Image bytes are read by ``ref.load()`` only and never decoded here.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlsplit

from lvlm.config.schema import IMAGE_POSITIONS, INTERLEAVED_FORMATS
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef, check_choice
from lvlm.data.sources.webdataset_caption import IMAGE_EXTENSIONS as CAPTION_IMAGE_EXTENSIONS
from lvlm.data.sources.tar_groups import Value, iter_tar_groups, read_member
from lvlm.data.sources.text import DocumentFileSource, file_key, iter_jsonl, iter_parquet_rows

ROLES: tuple[str, ...] = ("assistant", "user", "system")


@dataclass(frozen=True)
class _Member:
    """An image that is tar member ``KEY.<name>`` of the document's group."""

    name: str


@dataclass(frozen=True)
class _ImageFile:
    """An image that is a file, read by ``ref.load()``."""

    path: str


@dataclass(frozen=True)
class _Bytes:
    """An image member of a tar group: bytes, or where to read them (``read_member``) at load time."""

    value: Value


Item = Union[TextSegment, ImageSegment, _Member, _ImageFile, _Bytes]


def image_file_name(entry: str) -> str:
    """The file name an image entry refers to: the basename of a URL, else the entry itself."""
    return posixpath.basename(urlsplit(entry).path) if "://" in entry else entry


def parse_document_layout(raw: bytes) -> Optional[tuple[list[Item], dict]]:
    """``KEY.json`` of the document layout -> (items, meta), or None if it is malformed."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        return None
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        return None
    items: list[Item] = []
    for seg in doc["segments"]:
        if not isinstance(seg, dict):
            return None
        if seg.get("type") == "text":
            role = seg.get("role", "assistant")
            if not isinstance(seg.get("text"), str) or role not in ROLES:
                return None
            items.append(TextSegment(seg["text"], role=role))
        elif seg.get("type") == "image":
            if not isinstance(seg.get("member"), str) or not seg["member"]:
                return None
            items.append(_Member(seg["member"]))
        else:
            return None
    return items, meta


def caption_pair(group: dict[str, bytes]) -> Optional[tuple[list[Item], dict]]:
    """An img2dataset-layout member group without ``KEY.json`` (``KEY.jpg`` + ``KEY.txt``) -> [image, text],
    so shards that ``lvlm data convert`` wrote with caption pairs next to documents read as one source."""
    image = next((ext for ext in CAPTION_IMAGE_EXTENSIONS if ext in group), None)
    if image is None or "txt" not in group:
        return None
    try:
        caption = group["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return [_Member(image), TextSegment(caption)], {}


def parse_mmc4(doc: Any, image_folder: str, position: str) -> Optional[list[Item]]:
    """One mmc4 jsonl document -> items, or None if it is malformed."""
    if not isinstance(doc, dict):
        return None
    texts, infos = doc.get("text_list"), doc.get("image_info", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list):
        return None
    placed: list[list[_ImageFile]] = [[] for _ in texts]
    for info in infos:
        if not isinstance(info, dict) or not isinstance(info.get("image_name"), str) or not info["image_name"]:
            return None
        index = info.get("matched_text_index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(texts):
            return None
        placed[index].append(_ImageFile(os.path.join(image_folder, image_file_name(info["image_name"]))))
    items: list[Item] = []
    for text, images in zip(texts, placed):
        if position == "before":
            items.extend(images)
        items.append(TextSegment(text))
        if position == "after":
            items.extend(images)
    return items


def parse_obelics(row: dict, image_folder: str) -> Optional[list[Item]]:
    """One OBELICS row -> items, or None unless exactly one of texts[i]/images[i] is a string."""
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        return None
    items: list[Item] = []
    for text, image in zip(texts, images):
        if (text is None) == (image is None):
            return None
        if text is not None:
            if not isinstance(text, str):
                return None
            items.append(TextSegment(text))
        else:
            if not isinstance(image, str) or not image:
                return None
            items.append(_ImageFile(os.path.join(image_folder, image_file_name(image))))
    return items


class InterleavedSource(DocumentFileSource):
    """Interleaved documents from webdataset, mmc4 or obelics files (see the module docstring)."""

    order_tag = "lvlm.interleaved"

    def __init__(
        self,
        files: str,
        *,
        format: str = "webdataset",
        image_folder: str = "",
        image_position: str = "before",
        max_images: int = 0,
        name: str = "interleaved",
    ) -> None:
        check_choice("format", format, INTERLEAVED_FORMATS, "an interleaved")
        check_choice("image_position", image_position, IMAGE_POSITIONS, "an interleaved")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
            raise ValueError(f"max_images must be an int >= 0 (0 = no limit), got {max_images!r}")
        if format != "webdataset" and (not image_folder or not os.path.isdir(image_folder)):
            raise FileNotFoundError(f"image folder for the {format} interleaved source not found: {image_folder!r}")
        super().__init__(files, remote_ok=format == "webdataset", name=name)
        self.format = format
        self.image_folder = image_folder
        self.image_position = image_position
        self.max_images = max_images

    def _iter_file(self, url: str, skips: SkipCounter) -> Iterator[SampleRef]:
        if self.format == "webdataset":
            for key, group in iter_tar_groups(url, skips):
                parsed = parse_document_layout(group["json"]) if "json" in group else caption_pair(group)
                if parsed is None:
                    skips.add("bad_document")
                    continue
                items, meta = parsed
                ref = self._make_ref(items, skips, key, {"file": url, **({"meta": meta} if meta else {})},
                                     group=group)
                if ref is not None:
                    yield ref
        elif self.format == "mmc4":
            for line, doc in iter_jsonl(url, skips):
                items = parse_mmc4(doc, self.image_folder, self.image_position)
                if items is None:
                    skips.add("bad_document")
                    continue
                meta = {"file": url, **({"url": doc["url"]} if isinstance(doc.get("url"), str) else {})}
                ref = self._make_ref(items, skips, file_key(url, line), meta, sep=" ")
                if ref is not None:
                    yield ref
        else:
            for index, row in iter_parquet_rows(url, ("texts", "images"), skips):
                items = parse_obelics(row, self.image_folder)
                if items is None:
                    skips.add("bad_document")
                    continue
                ref = self._make_ref(items, skips, file_key(url, index), {"file": url}, sep="\n\n")
                if ref is not None:
                    yield ref

    def _make_ref(
        self,
        items: list[Item],
        skips: SkipCounter,
        key: str,
        meta: dict,
        *,
        group: Optional[dict[str, bytes]] = None,
        sep: Optional[str] = None,
    ) -> Optional[SampleRef]:
        """Apply the common rules (module docstring) in order; None when the document is skipped."""
        kept: list[Item] = []
        for item in items:
            if isinstance(item, TextSegment):
                if item.text.strip():
                    kept.append(TextSegment(item.text.strip(), role=item.role))
            else:
                kept.append(item)
        if not any(isinstance(item, TextSegment) for item in kept):
            skips.add("empty_text")
            return None
        resolved: list[Item] = []
        for item in kept:
            if isinstance(item, _Member):
                if group is None or item.name not in group:
                    skips.add("missing_image")
                    return None
                resolved.append(_Bytes(group[item.name]))
            elif isinstance(item, _ImageFile) and not os.path.isfile(item.path):
                skips.add("images_missing")  # this image only: the document is kept
            else:
                resolved.append(item)
        final: list[Item] = []
        num_images = 0
        for item in resolved:
            if not isinstance(item, TextSegment):
                num_images += 1
                if self.max_images and num_images > self.max_images:
                    skips.add("images_over_limit")
                    continue
            last = final[-1] if final else None
            if sep is not None and isinstance(item, TextSegment) and isinstance(last, TextSegment) \
                    and last.role == item.role:
                final[-1] = TextSegment(last.text + sep + item.text, role=item.role)
            else:
                final.append(item)
        return SampleRef(key=key, loader=partial(_build_sample, final, key, self.name, meta))


def _build_sample(items: list[Item], key: str, source: str, meta: dict) -> Sample:
    segments: list[Union[TextSegment, ImageSegment]] = []
    for item in items:
        if isinstance(item, TextSegment):
            segments.append(TextSegment(item.text, role=item.role))
        elif isinstance(item, ImageSegment):
            segments.append(ImageSegment(item.data))
        elif isinstance(item, _Bytes):
            segments.append(ImageSegment(read_member(item.value)))
        elif isinstance(item, _ImageFile):
            with open(item.path, "rb") as f:
                segments.append(ImageSegment(f.read()))
    return Sample(segments=segments, key=key, source=source, meta=dict(meta))
