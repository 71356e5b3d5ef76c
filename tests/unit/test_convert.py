"""Tests of ``lvlm.data.convert`` and ``lvlm data convert|verify``: layouts, manifest, determinism, skips."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from convert_fixtures import (
    all_members,
    caption,
    image_bytes,
    plain_record,
    tar_members,
    write_llava,
    write_mmc4,
    write_text_jsonl,
)
from lvlm.cli.data import FORMATS, load_stream
from lvlm.cli.main import main
from lvlm.data.convert import MANIFEST_NAME, convert, load_manifest, verify
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef
from lvlm.data.sources.llava_json import LLaVAJsonSource
from lvlm.data.sources.webdataset_caption import WebDatasetCaptionSource


def convert_llava(json_path: str, folder: str, out: str, **kwargs) -> tuple:
    skips = SkipCounter()
    source = LLaVAJsonSource(json_path, folder, drop_prompt=False)
    return convert(load_stream(source, skips), out, skips=skips, params={"format": "llava_json"}, **kwargs), skips


def shard_paths(out: str) -> list[str]:
    return [os.path.join(out, s.name) for s in load_manifest(out).shards]


def docs_of(out: str) -> dict[str, dict]:
    return {n: json.loads(d) for n, d in all_members(out).items() if n.endswith(".json")}


def test_plain_llava_roundtrips_through_caption_reader(tmp_path):
    json_path, folder = write_llava(str(tmp_path), plain=7, png_every=3)
    out = str(tmp_path / "out")
    manifest, _ = convert_llava(json_path, folder, out, samples_per_shard=3)
    assert manifest.kinds == {"caption": 7, "document": 0, "text": 0}
    names = all_members(out)
    assert sum(n.endswith(".png") for n in names) == 3 and sum(n.endswith(".jpg") for n in names) == 4
    expected = {}
    with open(json_path) as f:
        for record in json.load(f):
            with open(os.path.join(folder, record["image"]), "rb") as img:
                expected[record["conversations"][1]["value"]] = img.read()
    reader = WebDatasetCaptionSource("::".join(shard_paths(out)))
    skips = SkipCounter()
    got = {}
    for sample in reader.iter_samples(seed=0, epoch=0, skips=skips):
        assert [type(s) for s in sample.segments] == [ImageSegment, TextSegment]
        got[sample.segments[1].text] = sample.segments[0].data
    assert skips.total == 0 and got == expected


def test_conversation_becomes_document_with_roles(tmp_path):
    json_path, folder = write_llava(str(tmp_path), chats=1)
    out = str(tmp_path / "out")
    manifest, _ = convert_llava(json_path, folder, out)
    assert manifest.kinds == {"caption": 0, "document": 1, "text": 0}
    members = all_members(out)
    assert sorted(members) == ["000000000.img0.jpg", "000000000.json"]
    doc = json.loads(members["000000000.json"])
    segs = doc["segments"]
    assert segs[0] == {"type": "image", "member": "img0.jpg"}
    assert [s["role"] for s in segs[1:]] == ["user", "assistant", "user", "assistant"]
    assert segs[1]["text"] == "question 0 about image 0?" and segs[4]["text"] == "answer 1 for image 0."
    with open(os.path.join(folder, "c000.jpg"), "rb") as f:
        assert members["000000000." + segs[0]["member"]] == f.read()
    assert doc["meta"] == {"source": "llava_json", "source_key": "chat0", "image_path": "c000.jpg"}


def test_document_layout_reads_back_with_interleaved_source(tmp_path):
    try:
        from lvlm.config.schema import InterleavedSourceConfig
    except ImportError:
        pytest.skip("interleaved source not available yet")
    from lvlm.data.sources import build_source

    json_path, folder = write_llava(str(tmp_path), chats=2)
    out = str(tmp_path / "out")
    convert_llava(json_path, folder, out)
    source = build_source(InterleavedSourceConfig(format="webdataset", files="::".join(shard_paths(out))))
    skips = SkipCounter()
    samples = list(source.iter_samples(seed=0, epoch=0, skips=skips))
    assert skips.total == 0 and len(samples) == 2
    for sample in samples:
        assert isinstance(sample.segments[0], ImageSegment) and sample.segments[0].load().size == (10, 10)
        assert [s.role for s in sample.segments[1:]] == ["user", "assistant", "user", "assistant"]


def _text_source_or_skip() -> None:
    try:
        from lvlm.config.schema import TextSourceConfig  # noqa: F401
    except ImportError:
        pytest.skip("text source not available yet")


@pytest.mark.parametrize("as_txt", [False, True])
def test_text_jsonl(tmp_path, capsys, as_txt):
    _text_source_or_skip()
    texts = ["first document", "second document with ünïcode", "third"]
    path = write_text_jsonl(str(tmp_path / "t.jsonl"), texts)
    out = str(tmp_path / "out")
    argv = ["data", "convert", "--format", "text-jsonl", "--input", path, "--out", out, "--samples-per-shard", "2"]
    assert main(argv + (["--text-as-txt"] if as_txt else [])) == 0
    manifest = load_manifest(out)
    assert manifest.kinds == {"caption": 0, "document": 0, "text": 3}
    assert manifest.totals["shards"] == 2 and manifest.totals["text_chars"] == sum(len(t) for t in texts)
    members = all_members(out)
    if as_txt:
        assert sorted(m.decode() for m in members.values()) == sorted(texts)
        assert all(n.endswith(".txt") for n in members)
    else:
        docs = [json.loads(d) for d in members.values()]
        assert all(n.endswith(".json") for n in members)
        assert sorted(d["segments"][0]["text"] for d in docs) == sorted(texts)
        assert all(d["segments"] == [{"type": "text", "text": d["segments"][0]["text"], "role": "assistant"}]
                   for d in docs)


def test_second_conversion_is_byte_identical(tmp_path):
    json_path, folder = write_llava(str(tmp_path), plain=5, chats=2, png_every=2)
    first, _ = convert_llava(json_path, folder, str(tmp_path / "a"), samples_per_shard=3)
    os.rename(tmp_path / "images", tmp_path / "moved")  # the input's location does not change the shards
    folder = str(tmp_path / "moved")
    second, _ = convert_llava(json_path, folder, str(tmp_path / "b"), samples_per_shard=3)
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    assert first.to_dict() == second.to_dict()
    for a, b in zip(shard_paths(str(tmp_path / "a")), shard_paths(str(tmp_path / "b"))):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
    for path in shard_paths(str(tmp_path / "a")):
        for member in tarfile.open(path).getmembers():
            assert (member.mtime, member.uid, member.gid) == (0, 0, 0)


def test_manifest_counts_and_verify(tmp_path):
    json_path, folder = write_llava(str(tmp_path), plain=4, chats=1)
    out = str(tmp_path / "out")
    manifest, _ = convert_llava(json_path, folder, out, samples_per_shard=2, prefix="cc")
    with open(os.path.join(out, MANIFEST_NAME)) as f:
        on_disk = json.load(f)
    assert on_disk == manifest.to_dict()
    assert [s.name for s in manifest.shards] == ["cc-000000.tar", "cc-000001.tar", "cc-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [2, 2, 1]
    assert sum(s.num_images for s in manifest.shards) == 5
    for shard in manifest.shards:
        with open(os.path.join(out, shard.name), "rb") as f:
            data = f.read()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    texts = [caption(i) for i in range(4)] + ["question 0 about image 0?", "answer 0 for image 0.",
                                              "question 1 about image 0?", "answer 1 for image 0."]
    assert manifest.totals == {"samples": 5, "images": 5, "text_chars": sum(map(len, texts)), "shards": 3,
                               "bytes": sum(s.bytes for s in manifest.shards), "reencoded_images": 0}
    assert manifest.params["format"] == "llava_json" and manifest.params["lvlm_version"]
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert verify(out) == []
    with open(os.path.join(out, "cc-000001.tar"), "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = verify(out)
    assert len(problems) == 1 and problems[0].startswith("cc-000001.tar: sha256")
    os.remove(os.path.join(out, "cc-000002.tar"))
    assert any(p == "cc-000002.tar: missing" for p in verify(out))


def test_corrupt_and_missing_images_are_counted(tmp_path):
    json_path, folder = write_llava(str(tmp_path), plain=6, chats=1, missing=["plain1"], corrupt=["plain3", "chat0"])
    manifest, skips = convert_llava(json_path, folder, str(tmp_path / "out"))
    assert manifest.totals["samples"] == 4
    assert manifest.skips == {"corrupt_image": 2, "missing_image": 1} == skips.as_dict()


def test_unreadable_image_at_load_is_counted():
    def vanished() -> Sample:
        raise FileNotFoundError("image file vanished")

    class Source:
        name = "fake"

        def iter_refs(self, seed, epoch, skips):
            yield SampleRef("a", vanished)
            yield SampleRef("b", lambda: Sample([TextSegment("ok")], key="b"))

    skips = SkipCounter()
    assert [s.key for s in load_stream(Source(), skips)] == ["b"]
    assert skips.as_dict() == {"unreadable_image": 1}


def test_reencodes_other_formats_and_skips_empty(tmp_path):
    gif = image_bytes(3, "GIF")
    samples = [
        Sample([ImageSegment(gif), TextSegment("a gif")], key="g"),
        Sample([ImageSegment(Image.new("RGB", (4, 4), (1, 2, 3))), TextSegment("in memory")], key="m"),
        Sample([], key="empty"),
    ]
    manifest = convert(samples, str(tmp_path / "out"))
    members = all_members(str(tmp_path / "out"))
    assert sorted(members) == ["000000000.png", "000000000.txt", "000000001.png", "000000001.txt"]
    assert manifest.totals["reencoded_images"] == 2 and manifest.skips == {"empty_sample": 1}
    assert Image.open(io.BytesIO(members["000000001.png"])).getpixel((0, 0)) == (1, 2, 3)


def test_refuses_non_empty_out_dir(tmp_path):
    json_path, folder = write_llava(str(tmp_path), plain=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_llava(json_path, folder, str(out))
    assert os.listdir(out) == ["notes.txt"]
    convert_llava(json_path, folder, str(out), samples_per_shard=1, overwrite=True)
    assert len(os.listdir(out)) == 4
    # A previous conversion is replaced without leaving its extra shards behind; other files stay.
    manifest, _ = convert_llava(json_path, folder, str(out), samples_per_shard=5, overwrite=True)
    assert sorted(os.listdir(out)) == ["data-000000.tar", MANIFEST_NAME, "notes.txt"]
    assert manifest.totals["shards"] == 1 and verify(str(out)) == []


def test_cli_convert_and_verify(tmp_path, capsys):
    json_path, folder = write_llava(str(tmp_path), plain=3, chats=1, missing=["plain2"])
    out = str(tmp_path / "out")
    argv = ["data", "convert", "--format", "llava_json", "--input", json_path, "--image-folder", folder,
            "--out", out, "--samples-per-shard", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "converted 3 samples (caption 2, document 1, text 0; 3 images) into 2 shards" in printed
    assert "missing_image=1" in printed and f"manifest: {os.path.join(out, MANIFEST_NAME)}" in printed
    params = load_manifest(out).params
    assert params["inputs"] == [os.path.abspath(json_path)] and params["source_config"]["drop_prompt"] is False
    assert main(["data", "verify", out]) == 0 and "OK: 2 shards" in capsys.readouterr().out
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path)]) == 2


def test_cli_drop_prompt_writes_caption_pairs(tmp_path, capsys):
    json_path, folder = write_llava(str(tmp_path), chats=2)
    out = str(tmp_path / "out")
    assert main(["data", "convert", "--format", "llava_json", "--input", json_path, "--image-folder", folder,
                 "--out", out, "--drop-prompt"]) == 0
    assert load_manifest(out).kinds["document"] == 2  # two gpt turns each: still documents
    json_path, folder = write_llava(str(tmp_path / "p"), extra_records=[
        {**plain_record(0, "x.jpg"), "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                      {"from": "gpt", "value": "a caption"}]}],
        extra_images={"x.jpg": image_bytes(0)})
    out = str(tmp_path / "out2")
    assert main(["data", "convert", "--format", "llava_json", "--input", json_path, "--image-folder", folder,
                 "--out", out, "--drop-prompt"]) == 0
    assert load_manifest(out).kinds == {"caption": 1, "document": 0, "text": 0}


def test_cli_errors(tmp_path, capsys):
    json_path, folder = write_llava(str(tmp_path), plain=1)
    out = str(tmp_path / "out")
    assert main(["data", "convert", "--format", "bogus", "--input", json_path, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown --format 'bogus'" in err and all(f in err for f in FORMATS)
    assert main(["data", "convert", "--format", "llava_json", "--input", str(tmp_path / "nope.json"),
                 "--image-folder", folder, "--out", out]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "llava_json", "--input", json_path, "--out", out]) == 2
    assert "--image-folder" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "llava_json", "--input", json_path, "--image-folder",
                 str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert main(["data", "frobnicate"]) == 2
    assert main(["data"]) == 2 and not os.path.exists(out)


@pytest.mark.parametrize("position", ["before", "after"])
def test_mmc4_document_order(tmp_path, capsys, position):
    try:
        from lvlm.config.schema import InterleavedSourceConfig  # noqa: F401
    except ImportError:
        pytest.skip("interleaved source not available yet")
    path, folder = write_mmc4(str(tmp_path))
    out = str(tmp_path / "out")
    assert main(["data", "convert", "--format", "mmc4", "--input", path, "--image-folder", folder, "--out", out,
                 "--image-position", position]) == 0
    docs = docs_of(out)
    assert list(docs) == ["000000000.json"]
    segs = docs["000000000.json"]["segments"]
    img_a, img_b = {"type": "image", "member": "img0.jpg"}, {"type": "image", "member": "img1.png"}
    if position == "before":
        assert [s["type"] for s in segs] == ["image", "text", "image", "text"]
        assert segs[0] == img_a and segs[2] == img_b
        assert segs[1]["text"] == "The first sentence. A second one." and segs[3]["text"] == "The last sentence."
    else:
        assert [s["type"] for s in segs] == ["text", "image", "text", "image"]
        assert segs[0]["text"] == "The first sentence." and segs[1] == img_a and segs[3] == img_b
    assert all(s["role"] == "assistant" for s in segs if s["type"] == "text")
    members = all_members(out)
    assert members["000000000.img0.jpg"] == image_bytes(1, "JPEG")
    assert members["000000000.img1.png"] == image_bytes(2, "PNG")
    assert load_manifest(out).params["source_config"]["image_position"] == position
    assert tar_members(os.path.join(out, "data-000000.tar"))[0][0] == "000000000.json"


def test_obelics_and_text_parquet_convert(tmp_path, capsys):
    """OBELICS parquet + image folder -> documents in order (a malformed row counted); text parquet -> text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes(1, "JPEG"))
    rows = {"texts": [["Intro.", None, "After the image."], [None, None]],
            "images": [[None, "http://example.com/x/a.jpg", None], ["a.jpg", "a.jpg"]]}   # row 2: no text at all
    obelics = str(tmp_path / "obelics.parquet")
    pq.write_table(pa.table(rows), obelics)
    out = str(tmp_path / "out")
    assert main(["data", "convert", "--format", "obelics", "--input", obelics, "--image-folder", str(folder),
                 "--out", out]) == 0
    segs = docs_of(out)["000000000.json"]["segments"]
    assert [s["type"] for s in segs] == ["text", "image", "text"]
    assert segs[0]["text"] == "Intro." and segs[2]["text"] == "After the image."
    assert all_members(out)["000000000.img0.jpg"] == image_bytes(1, "JPEG")
    manifest = load_manifest(out)
    assert manifest.totals["samples"] == 1 and sum(manifest.skips.values()) == 1
    text = str(tmp_path / "text.parquet")
    pq.write_table(pa.table({"body": ["first document", "  ", "second document"]}), text)
    out2 = str(tmp_path / "out2")
    assert main(["data", "convert", "--format", "text-parquet", "--input", text, "--field", "body",
                 "--out", out2]) == 0
    texts = [d["segments"][0]["text"] for d in docs_of(out2).values()]
    assert texts == ["first document", "second document"] and load_manifest(out2).skips == {"empty_text": 1}
