"""Data mixtures: the exact-ratio schedule, and the loader over caption + interleaved + text sources
(rank/worker split without duplicates or gaps, exact resume, per-source counts, packing, skip limit)."""
from __future__ import annotations

import itertools
import os
from collections import Counter
from itertools import islice

import pytest
import torch

from data_fixtures import (IMAGE_SIZE, caption_member, fixture_tokenizer, image_transform, write_clean_shards,
                           write_shard)
from mixed_fixtures import mmc4_doc, write_document_shards, write_image, write_jsonl

from lvlm.config.schema import (DataConfig, InterleavedSourceConfig, MixtureComponent, TextSourceConfig,
                                WebDatasetSourceConfig)
from lvlm.data.build import TooManySkipsError, build_train_loader
from lvlm.data.mixture import Mixture, mix

TPI = 4


# ----------------------------------------------------------------------------- the schedule
def schedule(weights, n, by="samples", lengths=None):
    m = Mixture([f"s{i}" for i in range(len(weights))], weights, by)
    streams = [iter(lengths[i]) if lengths else itertools.repeat(1) for i in range(len(weights))]
    picks = list(islice(mix(streams, m, (lambda i, x: x) if by == "tokens" else None), n))
    return m, picks


@pytest.mark.parametrize("weights", [(45, 45, 10), (1, 1), (0.7, 0.2, 0.05, 0.05), (3, 1, 1, 1, 1, 1)])
def test_sample_shares_are_exact_over_every_window(weights):
    m, picks = schedule(weights, 3000)
    sources = [i for i, _ in picks]
    for start in range(0, 2700, 13):                                   # every window of 300 samples
        window = sources[start:start + 300]
        for i, p in enumerate(m.shares):
            assert abs(window.count(i) - p * 300) <= 2, (weights, start, i)
    assert m.samples == [sources.count(i) for i in range(len(weights))]
    assert schedule(weights, 3000)[1] == picks                          # deterministic, no RNG


def test_token_shares_stay_within_one_sample():
    lengths = [[5, 50, 7, 30] * 1000, [12] * 4000, [100, 1] * 2000]
    m, picks = schedule((2, 1, 1), 1500, by="tokens", lengths=lengths)
    total = sum(m.amount)
    for i, p in enumerate(m.shares):
        assert abs(m.amount[i] - p * total) <= 100                      # the longest sample
    sample_mode, _ = schedule((2, 1, 1), 1500)
    assert m.samples != sample_mode.samples                              # token mode really differs


def test_schedule_errors():
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        Mixture(["a", "b"], [1, 0])
    with pytest.raises(ValueError, match="unique"):
        Mixture(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="samples, tokens"):
        Mixture(["a"], [1], by="bytes")


# ----------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    captions, _ = write_clean_shards(str(root / "cap"), 3, 20)
    os.makedirs(root / "docs")
    docs, _ = write_document_shards(str(root / "docs"), 2, 15)
    text = write_jsonl(str(root / "text" / "t.jsonl"), [{"text": f"plain text number {i} is here"} for i in range(25)])
    return {"captions": (WebDatasetSourceConfig(shards=captions), 0.45),
            "docs": (InterleavedSourceConfig(format="webdataset", files=docs), 0.45),
            "text": (TextSourceConfig(format="jsonl", files=text), 0.10)}


def loader(tok, mixture, *, rank=0, world=1, workers=0, start=0, batch=4, pack=False, max_skip=1.0, by="samples"):
    cfg = DataConfig(mixture={n: MixtureComponent(source=s, weight=w) for n, (s, w) in mixture.items()},
                     max_length=64, shuffle_buffer=7, num_workers=workers, pack=pack, max_skip_fraction=max_skip,
                     mix_by=by)
    return build_train_loader(cfg, tokenizer=tok, image_transform=image_transform(IMAGE_SIZE), image_size=IMAGE_SIZE,
                              image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=TPI,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, micro_batch_size=batch, rank=rank, world_size=world,
                              seed=5, start_batch=start)


def tagged(batches):
    return [(s, k) for b in batches for s, k in zip(b["sources"], b["keys"])]


def test_two_ranks_two_workers_cover_the_stream_exactly(tok, mixed):
    reference = tagged(islice(iter(loader(tok, mixed)), 40))           # 160 samples, one process
    per_rank = [list(islice(iter(loader(tok, mixed, rank=r, world=2, workers=2)), 20)) for r in range(2)]
    for r, batches in enumerate(per_rank):
        assert [b["batch_index"] for b in batches] == list(range(20))
    # global sample i sits on rank i % 2 in batch (i // 2) // 4: rebuild the single-process order
    rebuilt = []
    for g in range(20):
        rows = [tagged([per_rank[r][g]]) for r in range(2)]
        for pos in range(4):
            rebuilt.extend(rows[r][pos] for r in range(2))
    assert rebuilt == reference                                         # no duplicate, no gap, same order
    kinds = [s for s, _ in reference]
    assert {k: kinds.count(k) for k in mixed} == {"captions": 72, "docs": 72, "text": 16}   # 45/45/10 of 160
    assert kinds != sorted(kinds)
    counts = per_rank[0][0]["source_counts"]
    assert sum(c[0] for c in counts.values()) == per_rank[0][0]["num_samples"]
    assert all(c[1] > 0 for c in counts.values())                       # token counts per source


def test_resume_continues_the_same_sequence(tok, mixed):
    full = list(islice(iter(loader(tok, mixed, workers=2)), 30))       # sources loop over their epochs
    resumed = list(islice(iter(loader(tok, mixed, workers=2, start=17)), 13))
    assert tagged(resumed) == tagged(full[17:])
    for a, b in zip(resumed, full[17:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_packed_batches_are_full_rows_of_the_same_stream(tok, mixed):
    """pack: a micro-batch is 3 rows of max_length filled in stream order (a sample that fits nowhere waits
    at most one batch); the packed batches hold the unpacked stream's samples without duplicate or gap,
    whatever the worker count, and resume exactly."""
    plain = tagged(islice(iter(loader(tok, mixed, batch=4)), 60))
    packed = list(islice(iter(loader(tok, mixed, batch=3, pack=True)), 12))
    taken = tagged(packed)
    held = 3                                                            # at most micro_batch_size samples wait
    got = Counter(taken)                                                # (sources repeat over epochs: multisets)
    assert not Counter(plain[:len(taken) - held]) - got                 # no gap
    assert not got - Counter(plain[:len(taken) + held])                 # no duplicate, stream order kept
    for b in packed:
        assert b["input_ids"].shape[0] <= 3 and b["input_ids"].shape[1] <= 64
        assert int((b["sequence_ids"] >= 0).sum()) == sum(b["lengths"])
        assert b["padding_waste"] == pytest.approx(1 - sum(b["lengths"]) / b["input_ids"].numel())
    waste = 1 - sum(sum(b["lengths"]) for b in packed) / sum(b["input_ids"].numel() for b in packed)
    assert waste < 0.10                                                 # rows are filled (5.6% here)
    two_workers = list(islice(iter(loader(tok, mixed, batch=3, pack=True, workers=2)), 12))
    resumed = list(islice(iter(loader(tok, mixed, batch=3, pack=True, workers=2, start=7)), 5))
    for a, b in zip(packed, two_workers):
        assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
    for a, b in zip(packed[7:], resumed):
        assert a["batch_index"] == b["batch_index"] and a["keys"] == b["keys"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_packed_ranks_each_keep_the_mixture_ratio(tok, mixed):
    """pack on 2 ranks: each source's samples are dealt to the ranks in turn, so both ranks pack the 1:1 mix
    (dealing the mixed stream by position gave each rank one source, and the global ratio drifted as the
    ranks packed different lengths at different speeds); together they hold no sample twice."""
    half = {"captions": (mixed["captions"][0], 1.0), "text": (mixed["text"][0], 1.0)}
    per_rank = [tagged(islice(iter(loader(tok, half, rank=r, world=2, batch=1, pack=True)), 3)) for r in range(2)]
    for taken in per_rank:
        kinds = Counter(s for s, _ in taken)
        assert set(kinds) == {"captions", "text"} and abs(kinds["captions"] - kinds["text"]) <= 2, kinds
    both = per_rank[0] + per_rank[1]
    assert len(both) == len(set(both))                                  # within one epoch of each source


def test_a_packed_batch_keeps_the_fillers_rows(tok, tmp_path):
    """Samples of 10, 6, 4, 8, 8, 4 tokens fill 2 rows of 20 first-fit in stream order (10+6+4, 8+8+4); laid
    out longest-first the same six need 3 rows (10+8, 8+6+4, 4), more than micro_batch_size: the batch must
    keep the rows the filler chose."""
    words = [8, 4, 2, 6, 6, 2, 18, 18, 18, 18]                          # + BOS + EOS = 10, 6, 4, 8, 8, 4, 20, ...
    text = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": " ".join(["cat"] * n)} for n in words])
    cfg = DataConfig(mixture={"text": MixtureComponent(source=TextSourceConfig(format="jsonl", files=text))},
                     max_length=20, shuffle_buffer=0, pack=True)
    batches = build_train_loader(cfg, tokenizer=tok, image_transform=image_transform(IMAGE_SIZE),
                                 image_size=IMAGE_SIZE, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                 tokens_per_image=TPI, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, micro_batch_size=2, rank=0, world_size=1, seed=0)
    first = next(iter(batches))
    assert first["lengths"] == [10, 6, 4, 8, 8, 4]
    assert first["num_rows"] == 2 and tuple(first["input_ids"].shape) == (2, 20)
    assert first["attention_mask"].sum(dim=1).tolist() == [20, 20]


def test_images_missing_from_kept_documents_are_not_skipped_samples(tok, tmp_path):
    """MMC4 downloads miss many images: each document keeps its text and present image, its two absent image
    files count `images_missing` (dropped parts, like images_over_limit) and never count towards
    data.max_skip_fraction (counted as skips, 2 of every 3 "samples" would have failed a 0.5 limit)."""
    folder = str(tmp_path / "images")
    docs = []
    for d in range(120):
        write_image(folder, f"ok{d}.jpg", d)
        docs.append(mmc4_doc(["a red cat", "the dog runs", "a bird"],
                             [(f"ok{d}.jpg", 0), (f"gone{d}a.jpg", 1), (f"gone{d}b.jpg", 2)]))
    path = write_jsonl(str(tmp_path / "d.jsonl"), docs)
    mixture = {"mmc4": (InterleavedSourceConfig(format="mmc4", files=path, image_folder=folder), 1.0)}
    batches = list(islice(iter(loader(tok, mixture, max_skip=0.5)), 25))
    assert sum(b["num_samples"] for b in batches) == 100
    assert all(b["pixel_values"].shape[0] == b["num_samples"] for b in batches)  # one image per document
    skipped = batches[-1]["skipped"]
    assert list(skipped) == ["images_missing"] and skipped["images_missing"] >= 200  # one source: no prefix


@pytest.mark.parametrize("pack", [False, True])
def test_the_skip_limit_counts_dropped_samples_alike_packed_or_not(tok, tmp_path, pack):
    """Documents whose image lies past max_length are dropped by the tokenizer (image_exceeds_max_length):
    40% of them stay under data.max_skip_fraction 0.5 and 60% exceed it, with or without packing (packed,
    the limit was measured against the kept samples only: 40% dropped read as 67%)."""
    folder = str(tmp_path / "images")
    for share, fails in ((2, False), (3, True)):                       # dropped: 2 or 3 of every 5 documents
        docs = []
        for d in range(400):
            write_image(folder, f"i{d}.jpg", d)
            text = " ".join(["cat"] * 80) if d % 5 < share else "a red cat"
            docs.append(mmc4_doc([text, "a dog"], [(f"i{d}.jpg", 1)]))
        path = write_jsonl(str(tmp_path / f"d{share}.jsonl"), docs)
        mixture = {"mmc4": (InterleavedSourceConfig(format="mmc4", files=path, image_folder=folder), 1.0)}
        read = iter(loader(tok, mixture, max_skip=0.5, pack=pack))
        if fails:
            with pytest.raises(TooManySkipsError, match="image_exceeds_max_length"):
                list(islice(read, 60))
        else:
            batches = list(islice(read, 60))
            assert batches[-1]["skipped"]["image_exceeds_max_length"] >= 80


@pytest.mark.parametrize("pack", [False, True])
def test_a_mixture_files_corrupt_images_under_their_source(tok, mixed, tmp_path, pack):
    """In a mixture every skip reason is NAME/reason, also corrupt_image (found when the batch is decoded)."""
    members = [caption_member(f"k{i}", i) for i in range(20)]
    members[2] = ("k2", {**members[2][1], "jpg": b"\xff\xd8\xff not a jpeg"})
    write_shard(str(tmp_path / "bad.tar"), members)
    mixture = {**mixed, "captions": (WebDatasetSourceConfig(shards=str(tmp_path / "bad.tar")), 0.45)}
    skipped = list(islice(iter(loader(tok, mixture, pack=pack)), 12))[-1]["skipped"]
    assert skipped.get("captions/corrupt_image", 0) >= 1 and "corrupt_image" not in skipped


def test_too_many_bad_samples_fail_the_run(tok, mixed, tmp_path):
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [{"text": "   "}] * 10 + [{"text": "one good line"}])
    mixture = {**mixed, "bad": (TextSourceConfig(format="jsonl", files=bad), 1.0)}
    with pytest.raises(TooManySkipsError, match="data.max_skip_fraction=0.2.*bad/empty_text"):
        list(islice(iter(loader(tok, mixture, max_skip=0.2)), 100))
    batches = list(islice(iter(loader(tok, mixture)), 100))          # limit 1.0: never fails, still counted
    assert batches[-1]["skipped"]["bad/empty_text"] > 100


def test_images_dropped_past_max_images_are_not_skipped_samples(tok, tmp_path):
    """max_images drops images, not documents: the drops are reported but never trip max_skip_fraction."""
    from mixed_fixtures import document_members, image_bytes, image_seg, text_seg, write_tar

    members = []
    for d in range(12):  # [text, image, image, image, text] documents
        key = f"three{d}"
        segs = [text_seg(f"{key} start"), *(image_seg(f"img{i}.jpg") for i in range(3)), text_seg(f"{key} end")]
        members += document_members(key, segs, {f"img{i}.jpg": image_bytes(3 * d + i) for i in range(3)})
    write_tar(str(tmp_path / "three.tar"), members)
    capped = {"docs": (InterleavedSourceConfig(format="webdataset", files=str(tmp_path / "three.tar"), max_images=1),
                       1.0)}
    batches = list(islice(iter(loader(tok, capped, max_skip=0.05)), 60))  # 240 documents: the check starts at 200
    dropped = sum(n for r, n in batches[-1]["skipped"].items() if r.endswith("images_over_limit"))
    assert dropped >= 2 * 200  # two images dropped per document read, far over 5% of the documents
    assert all(b["num_samples"] == 4 for b in batches)
