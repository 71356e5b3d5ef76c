"""Builders of tiny on-disk fixtures for the interleaved and text source tests.

Owns: small JPEG/PNG images (PIL), tar shards written member by member with ``tarfile`` (so the
member order and names are exactly what a test states), document-layout shards, jsonl files with
optional raw (malformed) lines, parquet files (pyarrow) and tar truncation. Everything is
deterministic and written under a directory the caller passes (``tmp_path``).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(index: int, fmt: str = "JPEG", size: int = 6) -> bytes:
    """A tiny single-colour image whose colour depends on ``index``."""
    image = Image.new("RGB", (size, size), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_image(folder: str, name: str, index: int) -> bytes:
    """Write ``folder/name`` (PNG when the name ends in .png, else JPEG); returns its bytes."""
    data = image_bytes(index, "PNG" if name.endswith(".png") else "JPEG")
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def write_tar(path: str, members: Sequence[tuple[str, bytes]]) -> None:
    """A tar file holding ``members`` = [(name, data)] in the order given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def document_members(
    key: str, segments: list[dict], images: dict[str, bytes], meta: Optional[dict] = None
) -> list[tuple[str, bytes]]:
    """The tar members of one document-layout document: ``KEY.json`` then ``KEY.<member>`` images."""
    doc: dict[str, Any] = {"segments": segments}
    if meta is not None:
        doc["meta"] = meta
    members = [(f"{key}.json", json.dumps(doc).encode("utf-8"))]
    members.extend((f"{key}.{name}", data) for name, data in images.items())
    return members


def text_seg(text: str, role: Optional[str] = None) -> dict:
    return {"type": "text", "text": text} if role is None else {"type": "text", "text": text, "role": role}


def image_seg(member: str) -> dict:
    return {"type": "image", "member": member}


def simple_document(key: str, index: int) -> list[tuple[str, bytes]]:
    """[text, image, text] with texts naming the key."""
    return document_members(
        key, [text_seg(f"{key} start"), image_seg("img0.jpg"), text_seg(f"{key} end")],
        {"img0.jpg": image_bytes(index)},
    )


def write_document_shards(directory: str, num_shards: int, per_shard: int) -> tuple[str, list[str]]:
    """``num_shards`` valid document-layout shards; returns (brace pattern, all keys)."""
    keys = []
    for s in range(num_shards):
        members: list[tuple[str, bytes]] = []
        for d in range(per_shard):
            key = f"doc{s}x{d}"
            members.extend(simple_document(key, s * per_shard + d))
            keys.append(key)
        write_tar(os.path.join(directory, f"docs-{s:02d}.tar"), members)
    return os.path.join(directory, f"docs-{{00..{num_shards - 1:02d}}}.tar"), keys


def truncate_in_member(path: str, name: str) -> None:
    """Cut a tar file in the middle of the data of member ``name``."""
    with tarfile.open(path) as tar:
        member = tar.getmember(name)
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + max(1, member.size // 2))


def write_jsonl(path: str, lines: Sequence[Union[dict, str]]) -> str:
    """One line per entry: dicts are JSON-encoded, strings are written raw (to make bad lines)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def mmc4_doc(texts: list[str], images: Sequence[tuple[str, int]], url: str = "http://example.com/page") -> dict:
    """An mmc4 document; ``images`` = [(image_name, matched_text_index)]."""
    return {
        "text_list": texts,
        "image_info": [{"image_name": n, "matched_text_index": i, "matched_sim": 0.3} for n, i in images],
        "url": url,
    }


def write_parquet(path: str, columns: dict[str, list], types: Optional[dict[str, pa.DataType]] = None) -> str:
    """A parquet file with the given columns (``types`` overrides the inferred arrow types)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    types = types or {}
    table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    pq.write_table(table, path)
    return path


def obelics_columns(rows: Sequence[tuple[list, list]]) -> dict[str, list]:
    """OBELICS ``texts``/``images`` columns from [(texts, images)] rows."""
    return {"texts": [r[0] for r in rows], "images": [r[1] for r in rows]}


OBELICS_TYPES = {"texts": pa.list_(pa.string()), "images": pa.list_(pa.string())}
