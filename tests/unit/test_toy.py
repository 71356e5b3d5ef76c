"""The embedded default's assets: a deterministic world whose captions match their scenes, and toy
backbones built, cached and loaded through the real loaders."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import webdataset as wds

from lvlm import toy
from lvlm.config import Config
from lvlm.config.schema import LLMConfig, OpenCLIPVisionConfig
from lvlm.data.sample import ImageSegment, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources.interleaved import InterleavedSource
from lvlm.data.sources.text import TextSource
from lvlm.models.llm import build_llm
from lvlm.models.vision import build_vision
from lvlm.toy.backbones import LLMSpec, VisionSpec
from lvlm.toy.scene import split_words, vocabulary
from lvlm.toy.tokenizer import build_tokenizer
from lvlm.toy.world import read_split, read_text, write_world

TINY = toy.ToySpec(n_train=64, n_val=16, shard_size=32, n_text=200, image_size=32,
                   llm=LLMSpec(hidden=32, layers=2, heads=2, intermediate=64, steps=30, batch=32),
                   vision=VisionSpec(width=32, layers=2, heads=2, patch=8, embed_dim=16, text_width=32,
                                     text_layers=1, steps=30, batch=32))


def _hashes(manifest: dict) -> list[str]:
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]] + \
        [manifest["text"]["sha256"]] + \
        [s["sha256"] for split in manifest["stories"].values() for s in split["shards"]] + \
        [s["sha256"] for s in manifest["text_shards"]["shards"]]


SMALL = dict(seed=0, n_train=40, n_val=8, shard_size=20, n_text=30, image_size=32)
"""A small world: 10 train / 4 val stories (set below), 30 text documents."""


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, write_world(out, **SMALL, n_stories=10, n_stories_val=4)


def _read(source, expected: int) -> list:
    skips = SkipCounter()
    docs = list(source.iter_samples(seed=0, epoch=0, skips=skips))
    assert skips.total == 0, skips
    assert len(docs) == expected
    return docs


def test_world_is_deterministic(tmp_path):
    a = write_world(tmp_path / "a", seed=3, n_train=20, n_val=5, shard_size=10, n_text=10)
    b = write_world(tmp_path / "b", seed=3, n_train=20, n_val=5, shard_size=10, n_text=10)
    c = write_world(tmp_path / "c", seed=4, n_train=20, n_val=5, shard_size=10, n_text=10)
    assert _hashes(a) == _hashes(b)
    assert _hashes(a) != _hashes(c)


def test_captions_state_the_scene(tmp_path):
    write_world(tmp_path, seed=0, n_train=40, n_val=4, shard_size=20, n_text=5)
    for key, jpg, caption, meta in read_split(tmp_path, "train"):
        assert meta["caption"] == caption and jpg[:2] == b"\xff\xd8"
        for obj in meta["objects"]:  # every group's colour, shape (plural by count) and count word appear
            noun = obj["shape"] + ("s" if obj["count"] > 1 else "")
            count = {1: r"(a|an|one)", 2: "two", 3: "three"}[obj["count"]]
            assert re.search(rf"\b{count} {obj['color']} {noun}\b", caption), (caption, obj)
        assert set(split_words(caption)) <= set(vocabulary())


def test_shards_have_img2dataset_layout(tmp_path):
    write_world(tmp_path, seed=0, n_train=20, n_val=4, shard_size=10, n_text=5)
    samples = list(wds.WebDataset(str(tmp_path / "captions" / "train-{000000..000001}.tar"), shardshuffle=False))
    assert len(samples) == 20
    assert all({"jpg", "txt", "json"} <= set(s) and re.fullmatch(r"\d{9}", s["__key__"]) for s in samples)


def test_tokenizer_round_trips_captions(tmp_path):
    tok = build_tokenizer()
    write_world(tmp_path, seed=1, n_train=30, n_val=2, shard_size=30, n_text=5)
    for _, _, caption, _ in read_split(tmp_path, "train"):
        ids = tok(caption, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == caption


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, toy.prepare(root, spec=TINY)


def test_prepare_builds_loadable_backbones(assets):
    root, out = assets
    report = json.loads((out / "toy_report.json").read_text())
    assert report["llm"]["final_loss"] < report["llm"]["first_loss"]  # it learned from the text
    assert report["llm"]["qa_documents"] == 100 and 0.0 <= report["llm"]["qa_accuracy"] <= 1.0  # + QA chats
    assert report["vision"]["final_loss"] < report["vision"]["first_loss"]
    lm = build_llm(LLMConfig(name_or_path=str(out / "llm")))
    assert lm.model_type == "llama" and lm.image_token_id == len(build_tokenizer())
    enc = build_vision(OpenCLIPVisionConfig(arch=str(out / "vision/model_config.json"),
                                            pretrained=str(out / "vision/open_clip_model.safetensors")))
    assert enc.image_size == 32 and enc.num_tokens() == 16 and enc.mean == (0.5, 0.5, 0.5)
    assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 32)


def test_prepare_is_cached_and_rebuilds_partial_dirs(assets, monkeypatch):
    root, out = assets
    calls = []

    def fake_write_world(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("build started")

    monkeypatch.setattr("lvlm.toy.world.write_world", fake_write_world)
    assert toy.prepare(root, spec=TINY) == out and calls == []  # COMPLETE marker respected
    other = toy.asset_dir(root, toy.ToySpec(seed=99))
    other.mkdir(parents=True)
    (other / "junk").write_text("left by a killed build")
    with pytest.raises(RuntimeError, match="build started"):  # the partial directory was not taken as done
        toy.prepare(root, spec=toy.ToySpec(seed=99))
    assert calls == [1] and not (other / "junk").exists()


def test_resolve_config_resolves_only_toy_paths(assets):
    root, out = assets
    cfg = toy.resolve_config(Config(), root=root, spec=TINY)
    assert cfg.model.llm.name_or_path == str(out / "llm")
    assert cfg.model.vision.arch == str(out / "vision/model_config.json")
    assert cfg.data.source.shards.startswith(str(out / "world/captions/train-"))
    assert Config().optim == cfg.optim and cfg.seed == 0
    assert toy.resolve("/abs/path") == "/abs/path"
    assert Path(toy.resolve("toy://world/manifest.json", root=root, spec=TINY)).is_file()


def test_stories_are_interleaved_documents(small_world):
    world, manifest = small_world
    assert [s["name"] for s in manifest["stories"]["train"]["shards"]] == \
        [f"stories/train-{i:06d}.tar" for i in range(4)]
    train = _read(InterleavedSource(str(world / "stories/train-{000000..000003}.tar"), format="webdataset"), 10)
    val = _read(InterleavedSource(str(world / "stories/val-000000.tar"), format="webdataset"), 4)
    docs = train + val
    assert len({d.key for d in docs}) == len(docs)
    words = set(vocabulary())
    for doc in docs:
        segs = doc.segments[1:] if isinstance(doc.segments[0], TextSegment) else doc.segments  # optional opening
        assert 2 <= len(segs) // 2 <= 4 and len(segs) % 2 == 0
        assert all(isinstance(s, ImageSegment) for s in segs[0::2])  # image, then the text about it
        assert all(isinstance(s, TextSegment) and s.role == "assistant" for s in segs[1::2])
        assert sum(isinstance(s, ImageSegment) for s in doc.segments) == len(doc.meta["meta"]["scenes"])
        for image, text, scene in zip(segs[0::2], segs[1::2], doc.meta["meta"]["scenes"]):
            assert scene["caption"] in text.text
            assert image.load().size == (32, 32)
        assert all(set(split_words(s.text)) <= words for s in doc.segments if isinstance(s, TextSegment))


def test_text_shards_hold_the_text_corpus(small_world):
    world, manifest = small_world
    assert [s["name"] for s in manifest["text_shards"]["shards"]] == ["text/train-000000.tar", "text/train-000001.tar"]
    docs = _read(TextSource(str(world / "text/train-{000000..000001}.tar"), format="webdataset"), 30)
    texts = [d.segments[0].text for d in docs]
    assert all(t.strip() for t in texts)
    assert sorted(texts) == sorted(read_text(world))  # the jsonl's documents (file order is shuffled by epoch)


def test_stories_and_text_shards_are_deterministic(small_world, tmp_path):
    world, manifest = small_world
    again = write_world(tmp_path / "again", **SMALL, n_stories=10, n_stories_val=4)
    names = [s["name"] for part in ("train", "val") for s in manifest["stories"][part]["shards"]] + \
        [s["name"] for s in manifest["text_shards"]["shards"]]
    assert again == manifest
    assert all((world / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in names)
    fewer = write_world(tmp_path / "fewer", **SMALL, n_stories=6, n_stories_val=1)  # captions do not depend on them
    assert fewer["splits"] == manifest["splits"] and fewer["text"] == manifest["text"]
    assert fewer["stories"]["val"]["samples"] == 1 and fewer["stories"] != manifest["stories"]
    with pytest.raises(ValueError, match="one story per shard"):
        write_world(tmp_path / "bad", **SMALL, n_stories=3)
