"""Tests of the caption data pipeline: sources, tokenization, collate and the exact loader order."""
from __future__ import annotations

import json
import os
from itertools import islice

import pytest
import torch

from data_fixtures import (
    IMAGE_SIZE,
    caption_member,
    fixture_tokenizer,
    image_transform,
    jpeg_bytes,
    truncate_mid_member,
    write_clean_shards,
    write_llava,
    write_shard,
)
from lvlm.config.schema import DataConfig, LLaVAJsonSourceConfig, WebDatasetSourceConfig
from lvlm.data.build import EmptySourceError, build_train_loader
from lvlm.data.chat import LLAVA_SYSTEM
from lvlm.data.collate import collate
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import build_source
from lvlm.data.sources.llava_json import LLaVAJsonSource
from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource
from lvlm.data.tokenize import IGNORE_INDEX, SampleTokenizer

TPI = 4  # tokens per image


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer()


def ids_of(tok) -> dict:
    return {
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def make_loader(tok, source_cfg, *, workers=0, batch=4, rank=0, world=1, start=0, shuffle=5, max_length=64, seed=3):
    return build_train_loader(
        DataConfig(source=source_cfg, max_length=max_length, shuffle_buffer=shuffle, num_workers=workers),
        tokenizer=tok,
        image_transform=image_transform(IMAGE_SIZE),
        image_size=IMAGE_SIZE,
        tokens_per_image=TPI,
        pad_token_id=tok.pad_token_id,
        micro_batch_size=batch,
        rank=rank,
        world_size=world,
        seed=seed,
        start_batch=start,
        **ids_of(tok),
    )


def take(loader, n):
    return list(islice(iter(loader), n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["batch_index"] == y["batch_index"]
        assert x["keys"] == y["keys"]
        for name in ("input_ids", "attention_mask", "labels", "pixel_values"):
            assert torch.equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    pattern, keys = write_clean_shards(str(tmp_path_factory.mktemp("wds")), num_shards=4, per_shard=5)
    return pattern, keys


# ------------------------------------------------------------------------------- tokenize


def sample_tokenizer(tok, max_length=64, tpi=TPI):
    return SampleTokenizer(tok, tokens_per_image=tpi, max_length=max_length, **ids_of(tok))


def test_label_masking_layout(tok):
    ids = ids_of(tok)
    st = sample_tokenizer(tok)
    sample = Sample([ImageSegment(jpeg_bytes(0)), TextSegment("describe the image", role="user"),
                     TextSegment("a red cat", role="assistant")], key="k")
    out = st(sample)
    # a conversation (it has a user turn) is laid out by lvlm.data.chat; this tokenizer has no chat
    # template, so LLaVA v1: "{system} USER: <image>\n{user} ASSISTANT: {answer}</s>"
    system = tok(f"{LLAVA_SYSTEM} USER: ", add_special_tokens=False)["input_ids"]
    user = tok("\ndescribe the image ASSISTANT: ", add_special_tokens=False)["input_ids"]
    cap = tok("a red cat", add_special_tokens=False)["input_ids"]
    img = [ids["image_token_id"]] * TPI
    assert out.input_ids == [ids["bos_token_id"], *system, *img, *user, *cap, ids["eos_token_id"]]
    assert out.labels == [IGNORE_INDEX] * (1 + len(system) + TPI + len(user)) + cap + [ids["eos_token_id"]]
    assert out.input_ids.count(ids["image_token_id"]) == TPI and len(out.images) == 1
    # a literal <image> in a caption never creates a stray placeholder
    stray = st(Sample([ImageSegment(b"x"), TextSegment("<image> a cat")]))
    assert stray.input_ids.count(ids["image_token_id"]) == TPI


def test_truncation_never_cuts_an_image_span(tok):
    ids = ids_of(tok)
    img = ImageSegment(jpeg_bytes(1))
    caption = TextSegment("a red cat sits on the grass")
    # text is cut, image intact
    out = sample_tokenizer(tok, max_length=1 + TPI + 2)(Sample([img, caption]))
    assert len(out.input_ids) == 1 + TPI + 2 and out.input_ids.count(ids["image_token_id"]) == TPI
    # the second image would cross max_length: it and everything after are dropped
    two = Sample([img, TextSegment("a cat"), img, TextSegment("a dog")])  # "a cat" = 2 tokens, no eos mid-document
    for max_length in range(1 + TPI + 2, 1 + TPI + 2 + TPI):
        out = sample_tokenizer(tok, max_length=max_length)(two)
        assert out.input_ids.count(ids["image_token_id"]) == TPI and len(out.images) == 1
        assert len(out.input_ids) <= max_length
    # the only image does not fit at all -> dropped with a reason
    skips = SkipCounter()
    prompt_first = Sample([TextSegment("describe the image briefly", role="user"), img, caption])
    assert sample_tokenizer(tok, max_length=1 + 4 + TPI - 1)(prompt_first, skips) is None
    assert skips["image_exceeds_max_length"] == 1
    # image fits but no caption token is left -> no supervised tokens
    assert sample_tokenizer(tok, max_length=1 + TPI)(Sample([img, caption]), skips) is None
    assert skips["no_supervised_tokens"] == 1


def test_tokens_per_image_copies(tok):
    ids = ids_of(tok)
    for tpi in (1, 3, 9):
        out = sample_tokenizer(tok, tpi=tpi)(Sample([ImageSegment(b""), TextSegment("a cat"), ImageSegment(b""),
                                                     TextSegment("a dog")]))
        assert out.input_ids.count(ids["image_token_id"]) == 2 * tpi
    with pytest.raises(ValueError, match="tokens_per_image"):
        sample_tokenizer(tok, tpi=0)


# -------------------------------------------------------------------------------- collate


def test_collate_padding_images_and_dummy(tok):
    st = sample_tokenizer(tok)
    a = st(Sample([ImageSegment(jpeg_bytes(2)), TextSegment("a red cat sits on the grass")], key="a"))
    b = st(Sample([TextSegment("a dog")], key="b"))
    batch = collate([a, b], image_transform(IMAGE_SIZE), tok.pad_token_id, IMAGE_SIZE)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
    pad = batch["attention_mask"][1] == 0
    assert (batch["input_ids"][1][pad] == tok.pad_token_id).all() and (batch["labels"][1][pad] == IGNORE_INDEX).all()
    assert batch["num_samples"] == 2 and batch["keys"] == ["a", "b"]
    assert batch["num_supervised_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    no_images = collate([b], image_transform(IMAGE_SIZE), tok.pad_token_id, IMAGE_SIZE)
    assert no_images["pixel_values"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)
    skips = SkipCounter()
    bad = st(Sample([ImageSegment(b"\xff\xd8\xff\xe0 not a jpeg"), TextSegment("a cat")], key="bad"))
    dummy = collate([bad], image_transform(IMAGE_SIZE), tok.pad_token_id, IMAGE_SIZE, skips)
    assert dummy["input_ids"].tolist() == [[tok.pad_token_id]] and dummy["attention_mask"].tolist() == [[1]]
    assert dummy["labels"].tolist() == [[IGNORE_INDEX]] and dummy["pixel_values"].shape[0] == 0
    assert dummy["num_supervised_tokens"] == 0 and skips["corrupt_image"] == 1


# -------------------------------------------------------------------------------- sources


def test_webdataset_source_order_is_deterministic(clean_shards):
    pattern, keys = clean_shards
    source = WebDatasetCaptionSource(pattern)
    epoch0 = [s.key for s in source.iter_samples(1, 0, SkipCounter())]
    assert sorted(epoch0) == sorted(keys)
    assert epoch0 == [s.key for s in source.iter_samples(1, 0, SkipCounter())]
    assert any([s.key for s in source.iter_samples(1, e, SkipCounter())] != epoch0 for e in (1, 2, 3))
    sample = next(source.iter_samples(1, 0, SkipCounter()))
    assert isinstance(sample.segments[0], ImageSegment) and isinstance(sample.segments[0].data, bytes)
    assert sample.segments[1].role == "assistant"
    by_json = WebDatasetCaptionSource(pattern, caption_key="caption")
    assert [s.segments[1].text for s in by_json.iter_samples(1, 0, SkipCounter())] == \
        [s.segments[1].text for s in source.iter_samples(1, 0, SkipCounter())]
    listed = "::".join(pattern.replace("{000..003}", n) for n in ("000", "001"))
    assert len(list(WebDatasetCaptionSource(listed).iter_refs(0, 0, SkipCounter()))) == 10


def test_webdataset_no_matching_shard(tmp_path):
    pattern = str(tmp_path / "none-{000..002}.tar")
    with pytest.raises(FileNotFoundError, match="none-"):
        WebDatasetCaptionSource(pattern)


def test_llava_source_plain_mode_and_missing_image(tmp_path, tok):
    json_path, folder = write_llava(str(tmp_path), 6, missing=(2,))
    skips = SkipCounter()
    plain = list(LLaVAJsonSource(json_path, folder).iter_samples(0, 0, skips))
    assert len(plain) == 5 and skips["missing_image"] == 1
    assert all([type(s) for s in x.segments] == [ImageSegment, TextSegment] for x in plain)
    assert all(x.segments[1].role == "assistant" for x in plain)
    chat = next(LLaVAJsonSource(json_path, folder, drop_prompt=False).iter_samples(0, 0, SkipCounter()))
    assert chat.segments[1].role == "user" and chat.segments[1].text == "describe the image briefly"
    cfg = LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder)
    batches = take(make_loader(tok, cfg, batch=5, shuffle=0), 2)  # one epoch per batch
    assert sorted(batches[0]["keys"]) == ["00000", "00001", "00003", "00004", "00005"]
    assert batches[0]["num_samples"] == 5 and batches[0]["pixel_values"].shape[0] == 5
    assert batches[1]["skipped"]["missing_image"] >= 1


def test_llava_bad_json_errors(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps({"id": "0"}))
    with pytest.raises(ValueError, match="dict.json.*list"):
        LLaVAJsonSource(str(not_list), str(folder))
    good = {"id": "0", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([good, good, {"id": "2", "image": "c.jpg"}, {"id": "3"}]))
    with pytest.raises(ValueError, match=r"bad.json: record 2 .*conversations"):
        LLaVAJsonSource(str(bad), str(folder))


def test_build_source_dispatch(clean_shards, tmp_path):
    pattern, _ = clean_shards
    assert isinstance(build_source(WebDatasetSourceConfig(shards=pattern)), WebDatasetCaptionSource)
    with pytest.raises(ValueError, match="toy://"):
        build_source(WebDatasetSourceConfig())


# ------------------------------------------------------------------------- loader ordering


def test_ranks_partition_each_epoch(tok, clean_shards):
    pattern, keys = clean_shards
    cfg = WebDatasetSourceConfig(shards=pattern)
    per_rank = [take(make_loader(tok, cfg, batch=5, rank=r, world=2), 4) for r in (0, 1)]
    for epoch in (0, 1):  # 20 samples = 2 batches of 5 per rank per epoch
        seen = [k for batches in per_rank for b in batches[2 * epoch: 2 * epoch + 2] for k in b["keys"]]
        assert len(seen) == len(set(seen)) == len(keys) and set(seen) == set(keys)
    epoch0 = [k for b in per_rank[0][:2] for k in b["keys"]]
    assert epoch0 != [k for b in per_rank[0][2:] for k in b["keys"]]
    assert [b["batch_index"] for b in per_rank[1]] == [0, 1, 2, 3]


def test_workers_match_in_process_and_resume_is_exact(tok, clean_shards):
    cfg = WebDatasetSourceConfig(shards=clean_shards[0])
    reference = take(make_loader(tok, cfg, workers=0, batch=3), 9)
    assert [b["batch_index"] for b in reference] == list(range(9))
    assert_same_batches(take(make_loader(tok, cfg, workers=2, batch=3), 9), reference)
    assert_same_batches(take(make_loader(tok, cfg, workers=0, batch=3, start=4), 5), reference[4:])
    assert_same_batches(take(make_loader(tok, cfg, workers=2, batch=3, start=5), 4), reference[5:])


def test_stop_workers_ends_them_now(tok, clean_shards):
    """Training ends its data workers explicitly: otherwise they live until interpreter exit, where the
    SIGTERM multiprocessing sends them is outlived by WORKER_GRACE_S (every run's exit took 2 minutes)."""
    import multiprocessing

    from lvlm.data.build import stop_workers

    batches = iter(make_loader(tok, WebDatasetSourceConfig(shards=clean_shards[0]), workers=2, batch=3))
    next(batches)
    workers = list(batches._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    stop_workers(batches)
    assert not any(w.is_alive() for w in workers)
    assert not [p for p in multiprocessing.active_children() if p in workers]
    stop_workers(iter(make_loader(tok, WebDatasetSourceConfig(shards=clean_shards[0]), workers=0)))  # no-op


def test_bad_data_is_skipped_and_counted(tmp_path, tok):
    d = str(tmp_path)
    corrupt = ("0000004", {"jpg": b"\xff\xd8\xff\xe0" + b"\x00garbage" * 8, "txt": b"a red cat"})
    write_shard(os.path.join(d, "s-000.tar"), [
        *(caption_member(f"000000{i}", i) for i in range(4)),
        corrupt,
        ("0000005", {"jpg": jpeg_bytes(5)}),                     # no caption
        ("0000006", {"txt": b"a dog"}),                          # no image
        caption_member("0000007", 7, caption="   "),             # empty caption
    ])
    write_shard(os.path.join(d, "s-001.tar"), [caption_member(f"001000{i}", 10 + i) for i in range(4)])
    truncate_mid_member(os.path.join(d, "s-001.tar"), 7)        # inside sample 2: samples 0 and 1 survive
    # s-002.tar is never written: a missing shard
    pattern = os.path.join(d, "s-{000..002}.tar")
    skips = SkipCounter()
    refs = list(WebDatasetCaptionSource(pattern).iter_refs(0, 0, skips))
    assert len(refs) == 7  # 4 + 1 (corrupt jpeg, caught at decode) + 2 before the truncation
    assert skips.as_dict() == {"corrupt_shard": 1, "empty_caption": 1, "missing_caption": 1,
                               "missing_image": 1, "missing_shard": 1}
    batches = take(make_loader(tok, WebDatasetSourceConfig(shards=pattern), batch=7, shuffle=0), 2)
    for batch in batches:  # one epoch per batch
        assert sorted(batch["keys"]) == ["0000000", "0000001", "0000002", "0000003", "0010000", "0010001"]
        assert batch["num_samples"] == 6 and batch["pixel_values"].shape[0] == 6
    # counts are cumulative as seen by the producer: epoch 0 is fully read once batch 1 exists
    assert batches[0]["skipped"]["corrupt_image"] == 1
    assert batches[1]["skipped"]["corrupt_image"] == 2
    assert set(batches[1]["skipped"]) == {"corrupt_image", *skips.as_dict()}


@pytest.mark.parametrize("workers", [0, 1])
def test_empty_source_raises(tmp_path, tok, workers):
    write_shard(str(tmp_path / "e-000.tar"), [caption_member("0", 0, caption=""), ("1", {"jpg": jpeg_bytes(1)})])
    loader = make_loader(tok, WebDatasetSourceConfig(shards=str(tmp_path / "e-000.tar")), workers=workers)
    with pytest.raises(EmptySourceError, match="no valid sample"):
        take(loader, 1)


def test_loader_rejects_max_length_without_room_for_an_image(tok, clean_shards):
    with pytest.raises(ValueError, match="max_length=5"):
        make_loader(tok, WebDatasetSourceConfig(shards=clean_shards[0]), max_length=5)


def test_eos_ends_each_assistant_turn_and_each_document(tok):
    """One EOS per assistant turn in a chat, one at the end of an interleaved document (not after each
    of its text pieces), one after a caption."""
    eos = tok.eos_token_id
    img = ImageSegment(jpeg_bytes(1))
    tokenize = sample_tokenizer(tok, max_length=200)
    chat = Sample([TextSegment("describe the image", role="user"), img, TextSegment("a red cat"),
                   TextSegment("and the dog", role="user"), TextSegment("a blue dog")])
    document = Sample([TextSegment("a red cat"), img, TextSegment("a blue dog"), img, TextSegment("a cat")])
    caption = Sample([img, TextSegment("a red cat")])
    for sample, expected in ((chat, 2), (document, 1), (caption, 1)):
        out = tokenize(sample)
        assert out.input_ids.count(eos) == expected, sample
        assert out.input_ids[-1] == eos and out.labels[-1] == eos         # supervised, at the very end


def test_local_shards_read_image_bytes_only_when_a_sample_is_loaded(tmp_path):
    """Walking the stream (every reader does) reads headers and captions; an image's bytes are read by
    ref.load() (only the reader owning the sample). Compressed shards are streamed and still work."""
    import gzip
    import shutil
    import tarfile

    from data_fixtures import caption_for

    from lvlm.data.sources.tar_groups import LazyMember, iter_tar_groups
    from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource

    path = str(tmp_path / "train-000.tar")
    write_shard(path, [caption_member(f"{i:04d}", i) for i in range(3)])
    groups = list(iter_tar_groups(path, SkipCounter()))
    assert isinstance(groups[1][1]["jpg"], LazyMember) and groups[1][1]["txt"] == caption_for(1).encode()
    refs = list(WebDatasetCaptionSource(path).iter_refs(0, 0, SkipCounter()))
    with tarfile.open(path) as tar:
        member = tar.getmember("0001.jpg")
    with open(path, "r+b") as f:                    # change the image bytes on disk after the walk
        f.seek(member.offset_data)
        f.write(b"\xff" * member.size)
    assert refs[1].load().segments[0].data == b"\xff" * member.size        # read at load time
    assert refs[0].load().segments[0].data == jpeg_bytes(0)
    gz = str(tmp_path / "train-001.tar.gz")
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    streamed = list(iter_tar_groups(gz, SkipCounter()))
    assert [k for k, _ in streamed] == ["0000", "0001", "0002"] and isinstance(streamed[0][1]["jpg"], bytes)
