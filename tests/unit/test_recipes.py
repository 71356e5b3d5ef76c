"""Shipped configs and data recipes parse; recipe weights are the papers'; ``lvlm.data.inspect`` measures a
fixture mixture (shares, modality mix, length histogram, padding, planted bad samples) without the toy world."""
from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path

import pytest
import yaml

from data_fixtures import (IMAGE_SIZE, caption_for, caption_member, fixture_tokenizer, image_transform, jpeg_bytes,
                           write_shard)
from mixed_fixtures import document_members, image_bytes, image_seg, text_seg, write_jsonl, write_tar

from lvlm.config import load_config
from lvlm.config.schema import (DataConfig, InterleavedSourceConfig, MixtureComponent, TextSourceConfig,
                                WebDatasetSourceConfig)
from lvlm.data.build import build_train_loader
from lvlm.data.inspect import DataSpec, format_report, inspect_data

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "data_recipes").glob("*.yaml"))
TPI = 4


# ------------------------------------------------------------------------------ shipped files
def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"llava558k_stage1.yaml", "vila_pretrain.yaml", "mm1_45_45_10.yaml", "vila_sft_text_reblend.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_parses(path):
    load_config(path)  # configs/ (single runs, pipelines, grids): test_config.py, test_ablate.py, test_experiments.py


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_a_commented_data_block(path):
    text = path.read_text()
    assert text.startswith("#"), "a recipe starts with a header comment (paper, real dataset, how to point it)"
    assert set(yaml.safe_load(text)) == {"data"}


def shares(path: str) -> dict[str, tuple[str, float]]:
    mixture = load_config(ROOT / "data_recipes" / path).data.mixture
    total = sum(c.weight for c in mixture.values())
    return {name: (type(c.source).__name__, round(c.weight / total, 6)) for name, c in mixture.items()}


def test_recipe_weights_match_the_papers():
    assert shares("mm1_45_45_10.yaml") == {"captions": ("WebDatasetSourceConfig", 0.45),
                                           "interleaved": ("InterleavedSourceConfig", 0.45),
                                           "text": ("TextSourceConfig", 0.10)}
    assert shares("vila_pretrain.yaml") == {"mmc4": ("InterleavedSourceConfig", 0.5),
                                            "coyo": ("WebDatasetSourceConfig", 0.5)}
    assert shares("vila_sft_text_reblend.yaml") == {"conversations": ("WebDatasetSourceConfig", round(5 / 6, 6)),
                                                    "text": ("TextSourceConfig", round(1 / 6, 6))}
    stage1 = load_config(ROOT / "data_recipes" / "llava558k_stage1.yaml").data
    assert not stage1.mixture and isinstance(stage1.source, WebDatasetSourceConfig)
    for name in ("mm1_45_45_10.yaml", "vila_pretrain.yaml"):
        data = load_config(ROOT / "data_recipes" / name).data
        assert data.pack and data.mix_by == "samples"


def test_recipe_points_at_real_data_with_overrides():
    cfg = load_config(ROOT / "data_recipes" / "mm1_45_45_10.yaml",
                      ["--data.mixture.captions.source.shards", "/data/coyo/{00000..00009}.tar",
                       "--data.mixture.interleaved.source.format", "obelics"])
    assert cfg.data.mixture["captions"].source.shards == "/data/coyo/{00000..00009}.tar"
    assert cfg.data.mixture["interleaved"].source.format == "obelics"
    assert cfg.data.mixture["text"].weight == 10


# ------------------------------------------------------------------------------------ inspect
@pytest.fixture(scope="module")
def spec():
    tok = fixture_tokenizer()
    return DataSpec(tok, image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=TPI,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def two_image_doc(key: str, index: int) -> list[tuple[str, bytes]]:
    segments = [text_seg(f"{key} a red cat"), image_seg("img0.jpg"), text_seg("and a blue dog"), image_seg("img1.jpg"),
                text_seg(caption_for(index, length=3 + index % 7))]
    return document_members(key, segments, {"img0.jpg": image_bytes(index), "img1.jpg": image_bytes(index + 1)})


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict[str, MixtureComponent]:
    """60 captions + one without a caption, 50 two-image documents, 20 texts + one malformed line."""
    root = tmp_path_factory.mktemp("recipe_mix")
    os.makedirs(root / "cap")
    for s in range(2):
        members = [caption_member(f"{s}{m:04d}", s * 30 + m, caption_for(s * 30 + m, length=2 + m % 9))
                   for m in range(30)]
        if s == 1:
            members.insert(7, ("10bad", {"jpg": jpeg_bytes(99)}))                  # no txt/json: missing_caption
        write_shard(str(root / "cap" / f"train-{s:03d}.tar"), members)
    for s in range(2):
        write_tar(str(root / "docs" / f"docs-{s:02d}.tar"),
                  [m for d in range(25) for m in two_image_doc(f"doc{s}x{d}", s * 25 + d)])
    text = write_jsonl(str(root / "text" / "t.jsonl"),
                       [{"text": caption_for(i, length=10 + i)} for i in range(20)] + ["{not json"])
    return {"captions": MixtureComponent(WebDatasetSourceConfig(shards=str(root / "cap" / "train-{000..001}.tar")), 45),
            "docs": MixtureComponent(InterleavedSourceConfig(format="webdataset",
                                                             files=str(root / "docs" / "docs-{00..01}.tar")), 45),
            "text": MixtureComponent(TextSourceConfig(format="jsonl", files=text), 10)}


def data_config(mixture, pack: bool = False) -> DataConfig:
    # a shuffle buffer larger than any source's epoch: each epoch is read once, so planted skips count once
    return DataConfig(mixture=mixture, max_length=48, shuffle_buffer=64, pack=pack)


@pytest.mark.parametrize("pack", [False, True])
def test_inspect_measures_a_fixture_mixture(spec, mixture, pack):
    report = inspect_data(data_config(mixture, pack), spec, num_samples=100, micro_batch_size=10, seed=3)
    n = report.samples                                  # packed batches (10 rows of 48) are read whole
    assert (n >= 100 and report.batches < 10) if pack else (n == 100 and report.batches == 10)
    by_name = {s.name: s for s in report.sources}
    for s in by_name.values():
        assert abs(s.samples - s.target_share * n) <= 2, s
        assert s.sample_share == s.samples / n
    assert sum(s.samples for s in by_name.values()) == n
    assert report.modality == {"text_only": by_name["text"].samples, "one_image": by_name["captions"].samples,
                               "multi_image": by_name["docs"].samples}
    assert by_name["docs"].images == 2 * by_name["docs"].samples
    assert by_name["docs"].image_tokens == 2 * TPI * by_name["docs"].samples
    assert sum(b["count"] for b in report.histogram) == n
    assert 5 <= len(report.histogram) <= 10
    assert report.histogram[0]["lo"] == report.length["min"] and report.histogram[-1]["hi"] == report.length["max"]
    assert report.length["max"] <= 48
    assert sum(s.tokens for s in by_name.values()) == round(report.length["mean"] * n)
    assert report.skipped == {"captions/missing_caption": 1, "text/bad_document": 1}
    padding = report.padding
    assert 0 <= padding["packed"] < padding["unpacked"] < 1
    assert padding["rows_unpacked"] == n and padding["rows_packed"] < n
    assert padding["configured"] == ("packed" if pack else "unpacked")
    json.dumps(report.to_dict())                                                      # the --json payload
    text = format_report(report, "fixture")
    assert "captions/missing_caption=1" in text and "docs" in text


def test_inspect_estimates_packing_as_the_loader_packs():
    """The packed-waste estimate of an unpacked config lays samples out as the loader's RowFiller does (first
    fit in stream order), not first-fit-decreasing: 10,6,4,8,8,4 into rows of 20 are 2 rows, not 3."""
    from lvlm.data.inspect import PACK_ORDER
    from lvlm.data.packing import RowFiller, plan_from_rows, plan_packing

    lengths = [10, 6, 4, 8, 8, 4]
    filler = RowFiller(rows=len(lengths), max_length=20)
    for n in lengths:
        filler.add(n)
    assert plan_packing(lengths, 20, PACK_ORDER) == plan_from_rows(lengths, 20, filler.placed) == [[0, 1, 2], [3, 4, 5]]


def test_inspect_reads_what_training_reads(spec, mixture):
    """Per-source counts equal those of the training loader's batches; packing changes only the padding."""
    cfg = data_config(mixture)
    cfg.num_workers = 0
    plain = inspect_data(cfg, spec, num_samples=60, micro_batch_size=10, seed=1)
    loader = build_train_loader(cfg, tokenizer=spec.tokenizer, image_transform=image_transform(IMAGE_SIZE),
                                image_size=IMAGE_SIZE, image_token_id=spec.image_token_id, tokens_per_image=TPI,
                                bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                                pad_token_id=spec.pad_token_id, micro_batch_size=10, rank=0, world_size=1, seed=1)
    counts: dict[str, list[int]] = {}
    for batch in islice(iter(loader), 6):
        for name, (samples, tokens) in batch["source_counts"].items():
            entry = counts.setdefault(name, [0, 0])
            entry[0] += samples
            entry[1] += tokens
    assert {s.name: [s.samples, s.tokens] for s in plain.sources} == counts
    packed = inspect_data(data_config(mixture, pack=True), spec, num_samples=60, micro_batch_size=10, seed=1)
    assert packed.samples >= 60 and all(abs(s.samples - s.target_share * packed.samples) <= 2 for s in packed.sources)
    assert packed.padding["packed"] < plain.padding["unpacked"]


def test_inspect_counts_a_corrupt_image(spec, tmp_path):
    members = [caption_member(f"{m:04d}", m) for m in range(10)]
    members[4] = ("0004", {"jpg": b"not a jpeg", "txt": b"a red cat"})                # decodes badly: corrupt_image
    write_shard(str(tmp_path / "train-000.tar"), members)
    cfg = DataConfig(source=WebDatasetSourceConfig(shards=str(tmp_path / "train-000.tar")), shuffle_buffer=0)
    report = inspect_data(cfg, spec, num_samples=9, micro_batch_size=5)
    assert report.samples == 9 and report.batches == 2
    assert report.skipped == {"corrupt_image": 1}
    assert report.skip_fraction == pytest.approx(1 / 10)
    assert report.sources[0].samples == 9 and report.modality["one_image"] == 9


def test_inspect_rejects_a_max_length_without_room_for_an_image(spec, mixture):
    with pytest.raises(ValueError, match="no room for one image"):
        inspect_data(DataConfig(mixture=mixture, max_length=TPI + 1), spec, num_samples=10)
