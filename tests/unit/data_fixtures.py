"""Builders of tiny on-disk data fixtures for the data-pipeline tests.

Owns: synthetic JPEG images (PIL), img2dataset-layout webdataset shards, a LLaVA-style JSON plus
image folder, a word-level tokenizer trained on the fixture captions (wrapped in
``PreTrainedTokenizerFast`` with ``<image>`` as a special token) and a picklable image
transform. Everything is deterministic and written under a directory the caller passes.
"""
from __future__ import annotations

import io
import json
import os
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = ("a", "red", "blue", "green", "cat", "dog", "bird", "sits", "runs", "on", "the", "grass", "sofa", "tree")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_SIZE = 8


def caption_for(index: int, length: int = 5) -> str:
    """A deterministic caption made of fixture words."""
    return " ".join(WORDS[(index * 5 + k * 3) % len(WORDS)] for k in range(length))


def jpeg_bytes(index: int, size: int = 12) -> bytes:
    """A small JPEG whose colours depend on ``index``."""
    image = Image.new("RGB", (size, size), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    ImageDraw.Draw(image).rectangle([2, 2, size // 2, size // 2], fill=(255 - (index * 37) % 256, 20, 200))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shard(path: str, members: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """One tar shard; ``members`` = [(key, {ext: bytes})] in img2dataset order."""
    with wds.TarWriter(path) as writer:
        for key, parts in members:
            writer.write({"__key__": key, **parts})


def caption_member(key: str, index: int, caption: Optional[str] = None) -> tuple[str, dict[str, bytes]]:
    caption = caption_for(index) if caption is None else caption
    return key, {
        "jpg": jpeg_bytes(index),
        "txt": caption.encode("utf-8"),
        "json": json.dumps({"key": key, "caption": caption}).encode("utf-8"),
    }


def write_clean_shards(directory: str, num_shards: int, per_shard: int) -> tuple[str, list[str]]:
    """``num_shards`` valid shards; returns (brace pattern, all keys)."""
    os.makedirs(directory, exist_ok=True)
    keys = []
    for s in range(num_shards):
        members = []
        for m in range(per_shard):
            index = s * per_shard + m
            key = f"{s:03d}{m:04d}"
            members.append(caption_member(key, index))
            keys.append(key)
        write_shard(os.path.join(directory, f"train-{s:03d}.tar"), members)
    return os.path.join(directory, f"train-{{000..{num_shards - 1:03d}}}.tar"), keys


def truncate_mid_member(path: str, member_index: int) -> None:
    """Cut a tar file in the middle of the data of its ``member_index``-th member."""
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + max(1, member.size // 2))


def build_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``texts`` with <pad> <unk> <s> </s> <image>."""
    model = Tokenizer(models.WordLevel(unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator(list(texts), trainer=trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def fixture_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer([" ".join(WORDS), "describe the image briefly"])


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    array = np.asarray(image.resize((size, size)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_transform(size: int = IMAGE_SIZE):
    """A picklable PIL -> [3, size, size] float tensor transform."""
    return partial(_to_tensor, size=size)


def write_llava(directory: str, num_records: int, *, missing: Sequence[int] = ()) -> tuple[str, str]:
    """A LLaVA-style JSON + image folder; images of records in ``missing`` are not written."""
    folder = os.path.join(directory, "images")
    os.makedirs(os.path.join(folder, "00000"), exist_ok=True)
    records = []
    for i in range(num_records):
        image = f"00000/{i:05d}.jpg"
        if i not in missing:
            with open(os.path.join(folder, image), "wb") as f:
                f.write(jpeg_bytes(i))
        records.append({
            "id": f"{i:05d}",
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\ndescribe the image briefly"},
                {"from": "gpt", "value": caption_for(i)},
            ],
        })
    json_path = os.path.join(directory, "chat.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return json_path, folder
