"""Tiny on-disk inputs for the converter tests (``lvlm data convert``).

Owns: small JPEG/PNG/GIF images made with PIL, a LLaVA-style JSON + image folder whose records are
either plain captions (the human turn is only ``<image>``) or multi-turn conversations, a text jsonl,
an MMC4 jsonl + image folder, and a reader of tar members in file order. Everything is deterministic
and written under a directory the caller passes (``tmp_path``).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Optional, Sequence

from PIL import Image, ImageDraw


def image_bytes(index: int, fmt: str = "JPEG", size: int = 10) -> bytes:
    """A small image in ``fmt`` (JPEG, PNG, GIF) whose colours depend on ``index``."""
    image = Image.new("RGB", (size, size), ((index * 41) % 256, (index * 89) % 256, (index * 23) % 256))
    ImageDraw.Draw(image).rectangle([1, 1, size // 2, size // 2], fill=(200, 255 - (index * 41) % 256, 30))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def caption(index: int) -> str:
    return f"caption number {index}: a small square of colour {index * 7 % 11}"


def plain_record(index: int, image: str) -> dict:
    """A LLaVA stage-1 style record whose human turn is only the image marker."""
    return {"id": f"plain{index}", "image": image,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(index)}]}


def chat_record(index: int, image: str, turns: int = 2) -> dict:
    """A conversation of ``turns`` human/gpt exchanges about one image."""
    conversations = []
    for t in range(turns):
        question = f"question {t} about image {index}?"
        conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
        conversations.append({"from": "gpt", "value": f"answer {t} for image {index}."})
    return {"id": f"chat{index}", "image": image, "conversations": conversations}


def write_llava(
    directory: str,
    *,
    plain: int = 0,
    chats: int = 0,
    png_every: int = 0,
    missing: Sequence[str] = (),
    corrupt: Sequence[str] = (),
    extra_images: Optional[dict[str, bytes]] = None,
    extra_records: Sequence[dict] = (),
) -> tuple[str, str]:
    """``llava.json`` + ``images/``; returns (json path, image folder).

    Records ``plain0..`` then ``chat0..``; every ``png_every``-th plain image is a PNG. Record ids in
    ``missing`` get no image file, ids in ``corrupt`` get garbage bytes. ``extra_images`` are written
    as given (name -> bytes) for ``extra_records``.
    """
    folder = os.path.join(directory, "images")
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(plain):
        png = bool(png_every) and i % png_every == 0
        records.append(plain_record(i, f"p{i:03d}.{'png' if png else 'jpg'}"))
    for i in range(chats):
        records.append(chat_record(i, f"c{i:03d}.jpg"))
    records.extend(extra_records)
    for n, record in enumerate(records):
        if record["id"] in missing or (extra_images and record["image"] in extra_images):
            continue
        fmt = "PNG" if record["image"].endswith(".png") else "JPEG"
        data = b"this is not an image at all" if record["id"] in corrupt else image_bytes(n, fmt)
        with open(os.path.join(folder, record["image"]), "wb") as f:
            f.write(data)
    for name, data in (extra_images or {}).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    json_path = os.path.join(directory, "llava.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return json_path, folder


def write_text_jsonl(path: str, texts: Sequence[str], field: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
    return path


def write_mmc4(directory: str) -> tuple[str, str]:
    """One MMC4 document: 3 sentences, a.jpg matched to sentence 0 and b.png to sentence 2."""
    folder = os.path.join(directory, "mmc4_images")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.jpg"), "wb") as f:
        f.write(image_bytes(1, "JPEG"))
    with open(os.path.join(folder, "b.png"), "wb") as f:
        f.write(image_bytes(2, "PNG"))
    doc = {
        "url": "https://example.org/page",
        "text_list": ["The first sentence.", "A second one.", "The last sentence."],
        "image_info": [{"image_name": "a.jpg", "matched_text_index": 0},
                       {"image_name": "b.png", "matched_text_index": 2}],
    }
    path = os.path.join(directory, "docs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc) + "\n")
    return path, folder


def tar_members(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar file, in file order."""
    with tarfile.open(path) as tar:
        out = []
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            out.append((member.name, handle.read() if handle is not None else b""))
        return out


def all_members(out_dir: str) -> dict[str, bytes]:
    """Every member of every ``*.tar`` in ``out_dir`` (names are unique across shards)."""
    members: dict[str, bytes] = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            members.update(tar_members(os.path.join(out_dir, name)))
    return members
