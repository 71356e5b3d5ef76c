"""Interleaved (document layout, mmc4, obelics) and text-only sources: segments, order, skips, config."""
from __future__ import annotations

import pytest
from mixed_fixtures import (
    OBELICS_TYPES,
    document_members,
    image_bytes,
    image_seg,
    mmc4_doc,
    obelics_columns,
    simple_document,
    text_seg,
    truncate_in_member,
    write_document_shards,
    write_image,
    write_jsonl,
    write_parquet,
    write_tar,
)

from lvlm.config.schema import InterleavedSourceConfig, SourceConfig, TextSourceConfig
from lvlm.data.sample import Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import build_source
from lvlm.data.sources.interleaved import InterleavedSource
from lvlm.data.sources.text import TextSource


def layout(sample: Sample) -> list[tuple]:
    """("T", text, role) / ("I", bytes) per segment, for exact comparisons."""
    return [("T", s.text, s.role) if isinstance(s, TextSegment) else ("I", s.data) for s in sample.segments]


def read_all(source, seed: int = 0, epoch: int = 0) -> tuple[list[Sample], SkipCounter]:
    skips = SkipCounter()
    return list(source.iter_samples(seed, epoch, skips)), skips


def assert_deterministic(source, expected_keys: list[str]) -> None:
    keys0 = [s.key for s in read_all(source, 3, 0)[0]]
    assert sorted(keys0) == sorted(expected_keys)
    assert keys0 == [ref.key for ref in source.iter_refs(3, 0, SkipCounter())]
    assert any([s.key for s in read_all(source, 3, e)[0]] != keys0 for e in (1, 2, 3))


# ------------------------------------------------------------------ interleaved: document layout


def test_document_layout_segments_roles_and_meta(tmp_path):
    jpg, png = image_bytes(1), image_bytes(2, "PNG")
    members = document_members(
        "doc17",
        [text_seg("be brief", "system"), image_seg("img0.jpg"), text_seg(" what is it? ", "user"),
         image_seg("img1.png"), text_seg("a red square")],
        {"img0.jpg": jpg, "img1.png": png}, meta={"url": "http://x"},
    ) + simple_document("doc18", 3)
    write_tar(str(tmp_path / "a.tar"), members)
    samples, skips = read_all(InterleavedSource(str(tmp_path / "a.tar")))
    assert [s.key for s in samples] == ["doc17", "doc18"] and skips.total == 0
    assert layout(samples[0]) == [("T", "be brief", "system"), ("I", jpg), ("T", "what is it?", "user"),
                                  ("I", png), ("T", "a red square", "assistant")]
    assert layout(samples[1]) == [("T", "doc18 start", "assistant"), ("I", image_bytes(3)),
                                  ("T", "doc18 end", "assistant")]
    assert samples[0].meta["meta"] == {"url": "http://x"} and samples[0].source == "interleaved"


def test_document_layout_skips(tmp_path):
    members = (
        simple_document("d0", 0)
        + document_members("d1", [text_seg("x"), image_seg("img9.jpg")], {"img0.jpg": image_bytes(1)})
        + [("d2.json", b"{not json")]
        + document_members("d3", [text_seg("x", "narrator")], {})
        + document_members("d4", [text_seg("  "), image_seg("img0.jpg")], {"img0.jpg": image_bytes(4)})
        + [("d5.img0.jpg", image_bytes(5))]
        + simple_document("d6", 6)
    )
    write_tar(str(tmp_path / "a.tar"), members)
    samples, skips = read_all(InterleavedSource(str(tmp_path / "a.tar")))
    assert [s.key for s in samples] == ["d0", "d6"]
    assert skips.as_dict() == {"bad_document": 3, "empty_text": 1, "missing_image": 1}


def test_document_layout_truncated_shard_keeps_earlier_docs(tmp_path):
    path = str(tmp_path / "a.tar")
    write_tar(path, simple_document("d0", 0) + simple_document("d1", 1) + simple_document("d2", 2))
    truncate_in_member(path, "d2.img0.jpg")
    missing = str(tmp_path / "gone.tar")
    samples, skips = read_all(InterleavedSource(f"{path}::{missing}"))
    assert [s.key for s in samples] == ["d0", "d1"]
    assert skips.as_dict() == {"corrupt_shard": 1, "missing_file": 1}


def test_document_layout_max_images_keeps_text(tmp_path):
    imgs = {f"img{i}.jpg": image_bytes(i) for i in range(3)}
    segs = [text_seg("t0"), image_seg("img0.jpg"), text_seg("t1"), image_seg("img1.jpg"), text_seg("t2"),
            image_seg("img2.jpg")]
    write_tar(str(tmp_path / "a.tar"), document_members("d", segs, imgs))
    samples, skips = read_all(InterleavedSource(str(tmp_path / "a.tar"), max_images=1))
    assert layout(samples[0]) == [("T", "t0", "assistant"), ("I", imgs["img0.jpg"]), ("T", "t1", "assistant"),
                                  ("T", "t2", "assistant")]
    assert skips.as_dict() == {"images_over_limit": 2}


def test_document_layout_order_is_deterministic(tmp_path):
    pattern, keys = write_document_shards(str(tmp_path), 4, 3)
    source = InterleavedSource(pattern)
    assert_deterministic(source, keys)
    assert [s.key for s in read_all(source, 3, 0)[0]] == [s.key for s in read_all(InterleavedSource(pattern), 3, 0)[0]]


# ---------------------------------------------------------------------------- interleaved: mmc4


@pytest.fixture
def mmc4_files(tmp_path):
    folder = str(tmp_path / "images")
    data = {name: write_image(folder, name, i) for i, name in enumerate(["x0.jpg", "x1.png", "x2.jpg"])}
    texts = ["A.", "B.", "C.", "D."]
    path = write_jsonl(str(tmp_path / "docs.jsonl"), [
        mmc4_doc(texts, [("x0.jpg", 1), ("x1.png", 3)]),
        mmc4_doc(texts, [("x0.jpg", 1), ("absent.jpg", 2), ("x2.jpg", 1)]),
        "{broken json",
        mmc4_doc(texts, [("x0.jpg", 7)]),
        mmc4_doc([" ", ""], [("x0.jpg", 0)]),
        mmc4_doc(["only text"], [("absent.jpg", 0)]),
        "",
        [1, 2],
    ])
    return path, folder, data


def test_mmc4_image_before_matched_sentence(mmc4_files):
    path, folder, data = mmc4_files
    samples, skips = read_all(InterleavedSource(path, format="mmc4", image_folder=folder))
    assert [s.key for s in samples] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:6"]
    assert layout(samples[0]) == [("T", "A.", "assistant"), ("I", data["x0.jpg"]), ("T", "B. C.", "assistant"),
                                  ("I", data["x1.png"]), ("T", "D.", "assistant")]
    assert layout(samples[1]) == [("T", "A.", "assistant"), ("I", data["x0.jpg"]), ("I", data["x2.jpg"]),
                                  ("T", "B. C. D.", "assistant")]
    assert layout(samples[2]) == [("T", "only text", "assistant")]
    assert samples[0].meta["url"] == "http://example.com/page"
    assert skips.as_dict() == {"bad_document": 3, "empty_text": 1, "images_missing": 2}


def test_mmc4_image_after_matched_sentence_and_max_images(mmc4_files):
    path, folder, data = mmc4_files
    after, _ = read_all(InterleavedSource(path, format="mmc4", image_folder=folder, image_position="after"))
    assert layout(after[0]) == [("T", "A. B.", "assistant"), ("I", data["x0.jpg"]), ("T", "C. D.", "assistant"),
                                ("I", data["x1.png"])]
    limited, skips = read_all(InterleavedSource(path, format="mmc4", image_folder=folder, max_images=1))
    assert layout(limited[0]) == [("T", "A.", "assistant"), ("I", data["x0.jpg"]), ("T", "B. C. D.", "assistant")]
    assert layout(limited[1]) == layout(limited[0])
    assert skips["images_over_limit"] == 2 and skips["images_missing"] == 2


def test_mmc4_order_is_deterministic_and_missing_file(tmp_path):
    folder = str(tmp_path / "images")
    write_image(folder, "x.jpg", 0)
    for f in range(4):
        write_jsonl(str(tmp_path / f"part{f}.jsonl"), [mmc4_doc([f"f{f} d{d}"], [("x.jpg", 0)]) for d in range(2)])
    keys = [f"part{f}.jsonl:{d}" for f in range(4) for d in (1, 2)]
    source = InterleavedSource(str(tmp_path / "part{0..4}.jsonl"), format="mmc4", image_folder=folder)
    assert_deterministic(source, keys)
    samples, skips = read_all(source)
    assert skips.as_dict() == {"missing_file": 1}
    assert [s.key for s in samples if s.key.startswith("part2")] == ["part2.jsonl:1", "part2.jsonl:2"]
    assert [layout(s) for s in samples if s.key.startswith("part2")][1][1] == ("T", "f2 d1", "assistant")


# ------------------------------------------------------------------------- interleaved: obelics


def test_obelics_rows_skips_and_max_images(tmp_path):
    folder = str(tmp_path / "images")
    a, b = write_image(folder, "img_a.jpg", 1), write_image(folder, "img_b.png", 2)
    rows = [
        (["P1", None, "P2", "P3", None], [None, "https://cdn.example.com/x/img_a.jpg?s=1", None, None, "img_b.png"]),
        (["P1", "P2"], [None, "img_a.jpg"]),  # both non-null at position 1
        (["P1", None], [None, None]),  # neither at position 1
        (["P1"], [None, None]),  # lengths differ
        (["  ", None], [None, "img_a.jpg"]),  # no text
        ([None, "kept"], ["missing.jpg", None]),
    ]
    path = write_parquet(str(tmp_path / "obelics.parquet"), obelics_columns(rows), OBELICS_TYPES)
    samples, skips = read_all(InterleavedSource(path, format="obelics", image_folder=folder))
    assert [s.key for s in samples] == ["obelics.parquet:0", "obelics.parquet:5"]
    assert layout(samples[0]) == [("T", "P1", "assistant"), ("I", a), ("T", "P2\n\nP3", "assistant"), ("I", b)]
    assert layout(samples[1]) == [("T", "kept", "assistant")]
    assert skips.as_dict() == {"bad_document": 3, "empty_text": 1, "images_missing": 1}
    limited, skips = read_all(InterleavedSource(path, format="obelics", image_folder=folder, max_images=1))
    assert layout(limited[0]) == [("T", "P1", "assistant"), ("I", a), ("T", "P2\n\nP3", "assistant")]
    assert skips["images_over_limit"] == 1


def test_obelics_order_missing_columns_and_missing_file(tmp_path):
    folder = str(tmp_path / "images")
    write_image(folder, "i.jpg", 0)
    for f in range(3):
        write_parquet(str(tmp_path / f"o{f}.parquet"),
                      obelics_columns([([f"f{f} r{r}", None], [None, "i.jpg"]) for r in range(2)]), OBELICS_TYPES)
    write_parquet(str(tmp_path / "o3.parquet"), {"text": ["a", "b", "c"]})
    pattern = str(tmp_path / "o{0..4}.parquet")
    source = InterleavedSource(pattern, format="obelics", image_folder=folder)
    assert_deterministic(source, [f"o{f}.parquet:{r}" for f in range(3) for r in range(2)])
    assert read_all(source)[1].as_dict() == {"bad_document": 3, "missing_file": 1}


# ------------------------------------------------------------------------------------- text


def test_text_jsonl_fields_and_skips(tmp_path):
    path = write_jsonl(str(tmp_path / "t.jsonl"), [
        {"text": "  first doc "}, {"body": "no text field"}, {"text": 5}, "not json", {"text": "\n "},
        {"text": "second doc", "body": "b"}, "[1]",
    ])
    samples, skips = read_all(TextSource(path))
    assert [layout(s) for s in samples] == [[("T", "first doc", "assistant")], [("T", "second doc", "assistant")]]
    assert [s.key for s in samples] == ["t.jsonl:1", "t.jsonl:6"]
    assert skips.as_dict() == {"bad_document": 4, "empty_text": 1}
    body, skips = read_all(TextSource(path, field="body"))
    assert [layout(s) for s in body] == [[("T", "no text field", "assistant")], [("T", "b", "assistant")]]
    assert skips.as_dict() == {"bad_document": 5}


def test_text_webdataset_ignores_other_members_and_keeps_docs_before_damage(tmp_path):
    path = str(tmp_path / "t.tar")
    write_tar(path, [("a.txt", b"alpha"), ("a.jpg", image_bytes(0)), ("b.json", b"{}"), ("c.txt", b"   "),
                     ("d.txt", b"\xff\xfe"), ("e.txt", b"epsilon"), ("f.jpg", image_bytes(1)), ("f.txt", b"phi")])
    samples, skips = read_all(TextSource(path, format="webdataset"))
    assert [(s.key, layout(s)) for s in samples] == [("a", [("T", "alpha", "assistant")]),
                                                     ("e", [("T", "epsilon", "assistant")]),
                                                     ("f", [("T", "phi", "assistant")])]
    assert skips.as_dict() == {"bad_document": 2, "empty_text": 1}
    truncate_in_member(path, "f.jpg")
    samples, skips = read_all(TextSource(path, format="webdataset"))
    assert [s.key for s in samples] == ["a", "e"] and skips.as_dict() == {"bad_document": 2, "corrupt_shard": 1,
                                                                          "empty_text": 1}


def test_text_parquet_column_and_skips(tmp_path):
    path = write_parquet(str(tmp_path / "t.parquet"), {"content": ["one", None, " ", "two"], "n": [1, 2, 3, 4]})
    samples, skips = read_all(TextSource(path, format="parquet", field="content"))
    assert [layout(s) for s in samples] == [[("T", "one", "assistant")], [("T", "two", "assistant")]]
    assert [s.key for s in samples] == ["t.parquet:0", "t.parquet:3"]
    assert skips.as_dict() == {"bad_document": 1, "empty_text": 1}
    assert read_all(TextSource(path, format="parquet"))[1].as_dict() == {"bad_document": 4}
    assert read_all(TextSource(path, format="parquet", field="n"))[1].as_dict() == {"bad_document": 4}
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    assert read_all(TextSource(f"{bad}::{path}", format="parquet", field="content"))[1]["corrupt_file"] == 1


def test_text_order_is_deterministic_and_missing_file(tmp_path):
    for f in range(4):
        write_jsonl(str(tmp_path / f"t{f}.jsonl"), [{"text": f"file {f} doc {d}"} for d in range(3)])
    source = TextSource(str(tmp_path / "t{0..4}.jsonl"))
    assert_deterministic(source, [f"t{f}.jsonl:{d}" for f in range(4) for d in (1, 2, 3)])
    assert read_all(source)[1].as_dict() == {"missing_file": 1}
    with pytest.raises(FileNotFoundError, match="nothing-"):
        TextSource(str(tmp_path / "nothing-{0..2}.jsonl"))


# ----------------------------------------------------------------------------------- config


def test_build_source_from_configs(tmp_path, mmc4_files):
    path, folder, data = mmc4_files
    assert SourceConfig.get_choice_class("interleaved") is InterleavedSourceConfig
    assert SourceConfig.get_choice_class("text") is TextSourceConfig
    source = build_source(InterleavedSourceConfig(format="mmc4", files=path, image_folder=folder, max_images=1))
    assert isinstance(source, InterleavedSource) and source.name == "interleaved" and source.max_images == 1
    assert layout(next(source.iter_samples(0, 0, SkipCounter())))[1] == ("I", data["x0.jpg"])
    text_path = write_jsonl(str(tmp_path / "t.jsonl"), [{"body": "hello"}])
    text = build_source(TextSourceConfig(files=text_path, field="body"), name="mine")
    assert isinstance(text, TextSource) and text.name == "mine"
    assert [layout(s) for s in text.iter_samples(0, 0, SkipCounter())] == [[("T", "hello", "assistant")]]
    seen = []
    resolved = build_source(TextSourceConfig(files=f"toy://a.jsonl::{text_path}"),
                            resolve_path=lambda p: seen.append(p) or (text_path if p.startswith("toy://") else p))
    assert seen == ["toy://a.jsonl", text_path] and resolved.files == [text_path, text_path]
    with pytest.raises(ValueError, match="toy://"):
        build_source(TextSourceConfig(files="toy://a.jsonl"))


def test_build_source_refuses_bad_choices(tmp_path):
    with pytest.raises(ValueError) as err:
        build_source(InterleavedSourceConfig(format="csv", files=str(tmp_path / "a.tar")))
    assert str(err.value) == ("format='csv' is not valid for an interleaved source; "
                              "choose one of 'webdataset', 'mmc4', 'obelics'")
    with pytest.raises(ValueError, match=r"image_position='middle' .* 'before', 'after'"):
        build_source(InterleavedSourceConfig(format="mmc4", files="x.jsonl", image_position="middle"))
    with pytest.raises(ValueError, match=r"format='tsv' is not valid for a text source; .*'jsonl', 'webdataset'"):
        build_source(TextSourceConfig(format="tsv", files="x.txt"))
    with pytest.raises(FileNotFoundError, match="image folder"):
        build_source(InterleavedSourceConfig(format="obelics", files="x.parquet", image_folder=str(tmp_path / "no")))
    with pytest.raises(ValueError, match="max_images"):
        InterleavedSource("x.tar", max_images=-1)
    with pytest.raises(ValueError, match="files must be"):
        build_source(TextSourceConfig(files=""))


def test_document_shards_also_read_caption_pairs(tmp_path):
    """`lvlm data convert` writes caption pairs in the img2dataset layout next to documents: one
    interleaved webdataset source reads both; a group with neither layout is a bad document."""
    path = str(tmp_path / "mixed.tar")
    write_tar(path, [*simple_document("doc0", 0), ("cap1.jpg", image_bytes(1)), ("cap1.txt", b"a red cat"),
                     ("orphan.jpg", image_bytes(2))])
    skips = SkipCounter()
    samples = list(InterleavedSource(path, format="webdataset").iter_samples(0, 0, skips))
    assert [s.key for s in samples] == ["doc0", "cap1"]
    cap = samples[1].segments
    assert len(cap) == 2 and cap[0].data == image_bytes(1) and cap[1].text == "a red cat"
    assert skips.as_dict() == {"bad_document": 1}


@pytest.mark.parametrize("cut", ["at_header", "mid_header", "mid_data"])
@pytest.mark.parametrize("mode", ["local", "pipe", "gzip"])
def test_a_shard_cut_anywhere_counts_corrupt_shard(tmp_path, cut, mode):
    """A shard cut off at or inside a header (an interrupted download or writer) must count corrupt_shard like
    one cut inside member data: tarfile alone takes such a header for the end of the archive, and the rest of
    the shard was lost uncounted. Local (seeking) and streamed walks (pipe:, gzip) alike; valid shards whole."""
    import gzip
    import tarfile

    from lvlm.data.sources.tar_groups import iter_tar_groups

    path = str(tmp_path / "docs.tar")
    write_tar(path, [(f"d{i}.txt", f"a red cat number {i} ".encode() * 40) for i in range(10)])
    with tarfile.open(path) as tar:
        member = tar.getmembers()[5]
    whole = open(path, "rb").read()
    offset = {"at_header": member.offset, "mid_header": member.offset + 100, "mid_data": member.offset_data + 10}[cut]

    def walk(data: bytes) -> tuple[list[str], dict]:
        target = tmp_path / ("shard.tar.gz" if mode == "gzip" else "shard.tar")
        target.write_bytes(gzip.compress(data) if mode == "gzip" else data)
        skips = SkipCounter()
        url = f"pipe:cat {target}" if mode == "pipe" else str(target)
        return [key for key, _ in iter_tar_groups(url, skips)], skips.as_dict()

    assert walk(whole) == ([f"d{i}" for i in range(10)], {})
    keys, skips = walk(whole[:offset])
    assert skips == {"corrupt_shard": 1}
    assert keys == [f"d{i}" for i in range(5 if cut == "mid_data" else 4)]  # the group being read is dropped

