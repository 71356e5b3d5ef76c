"""The MIR probe set from any configured data source: images from a LLaVA JSON whose text-only records are
passed over (and counted), texts from a parquet column; seeded and hashed on content; undecodable images
passed over; too few usable samples refused."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from data_fixtures import IMAGE_SIZE, image_transform, jpeg_bytes, write_llava
from mixed_fixtures import write_parquet

from lvlm.config.schema import LLaVAJsonSourceConfig, MIRConfig, TextSourceConfig
from lvlm.mir.probe import build_probe
from lvlm.toy.tokenizer import build_tokenizer

TOKENS = 3


def probe(cfg: MIRConfig):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    out = build_probe(cfg, tokenizer=tok, image_transform=image_transform(), image_size=IMAGE_SIZE,
                      image_token_id=image_id, tokens_per_image=TOKENS, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out, tok, image_id


@pytest.fixture
def sources(tmp_path):
    json_path, folder = write_llava(str(tmp_path / "llava"), 10)
    records = json.loads(open(json_path).read())
    for r in records[:4]:  # text-only conversations (as in LLaVA-1.5's SFT mix): no image to probe with
        del r["image"]
    open(json_path, "w").write(json.dumps(records))
    articles = [f"a {c} {s} is left of a {o} square" for c in ("red", "green", "blue") for s in ("circle", "triangle")
                for o in ("red", "yellow")]  # 12 distinct texts in the toy tokenizer's words
    texts = write_parquet(str(tmp_path / "cnn" / "articles.parquet"), {"article": articles, "id": list(range(12))})
    images = LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="chat")
    return images, TextSourceConfig(format="parquet", files=texts, field="article"), records, articles


def test_probe_from_llava_json_images_and_parquet_texts(sources):
    images, texts, records, articles = sources
    cfg = MIRConfig(images=images, texts=texts, num_samples=6, batch_size=4, max_length=256)
    got, tok, image_id = probe(cfg)
    assert got.num_samples == 6 and [len(b["input_ids"]) for b in got.batches] == [4, 2]
    # only 6 of the 10 records have an image: every one of them is used, the text-only ones were passed over
    assert got.skipped.get("mir_images_without_image", 0) >= 2
    pixels = {tuple(p.flatten().tolist()) for b in got.batches for p in b["pixel_values"]}
    assert len(pixels) == 6  # six different images: all six records that have one
    seen_texts = set()
    for batch in got.batches:
        assert int(batch["vision_mask"].sum()) == TOKENS * len(batch["input_ids"])
        for row, text_mask in zip(batch["input_ids"], batch["text_mask"]):
            text = tok.decode(row[text_mask].tolist(), skip_special_tokens=True).split("assistant :")[-1].strip()
            seen_texts.add(text)
            assert text in articles, text  # the unrelated texts are the parquet column's
    assert len(seen_texts) == 6
    # seeded and hashed: the same seed draws the same probe, another seed another one
    assert probe(cfg)[0].digest == got.digest
    assert probe(MIRConfig(images=images, texts=texts, num_samples=6, seed=1, max_length=256))[0].digest != got.digest


def test_probe_refuses_too_few_usable_samples(sources):
    images, texts, _, _ = sources
    with pytest.raises(ValueError, match=r"needs 7 images; fewer of those in mir llava_json source .* are usable"):
        probe(MIRConfig(images=images, texts=texts, num_samples=7, max_length=256))
    with pytest.raises(ValueError, match=r"needs 13 images; mir llava_json source .* holds 10"):
        probe(MIRConfig(images=images, texts=texts, num_samples=13, max_length=256))


def test_the_digest_follows_the_probe_content_not_its_location(sources, tmp_path):
    """Same inputs anywhere -> same digest; other texts, other image bytes under the same names, or a
    mir.max_length that cuts the texts (other token ids) -> another digest (it once hashed only keys and text
    indices)."""
    images, texts, _, articles = sources
    cfg = dict(num_samples=6, max_length=256)
    base = probe(MIRConfig(images=images, texts=texts, **cfg))[0].digest
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(images.json_path), moved)
    relocated = LLaVAJsonSourceConfig(json_path=str(moved / "chat.json"), image_folder=str(moved / "images"),
                                      format="chat")
    assert probe(MIRConfig(images=relocated, texts=texts, **cfg))[0].digest == base
    changed = [a.replace("square", "circle") for a in articles]
    other = write_parquet(str(tmp_path / "other.parquet"), {"article": changed, "id": list(range(12))})
    other_texts = TextSourceConfig(format="parquet", files=other, field="article")
    assert probe(MIRConfig(images=images, texts=other_texts, **cfg))[0].digest != base
    assert probe(MIRConfig(images=images, texts=texts, num_samples=6, max_length=14))[0].digest != base  # texts cut
    for i in range(10):  # same file names, other pictures
        path = moved / "images" / "00000" / f"{i:05d}.jpg"
        if path.exists():
            path.write_bytes(jpeg_bytes(i + 50))
    assert probe(MIRConfig(images=relocated, texts=texts, **cfg))[0].digest != base


def test_an_undecodable_probe_image_is_passed_over_and_counted(tmp_path):
    """Half of the 10 images are not JPEGs: the probe of 5 uses exactly the 5 good ones and counts the bad ones
    it drew; one more than the good ones is refused, naming the reason."""
    json_path, folder = write_llava(str(tmp_path / "llava"), 10)
    for i in range(0, 10, 2):
        with open(os.path.join(folder, "00000", f"{i:05d}.jpg"), "wb") as f:
            f.write(b"not a jpeg")
    images = LLaVAJsonSourceConfig(json_path=json_path, image_folder=folder, format="chat")
    texts = write_parquet(str(tmp_path / "t.parquet"), {"article": [f"a red circle {i}" for i in range(10)]})
    texts = TextSourceConfig(format="parquet", files=texts, field="article")
    got = probe(MIRConfig(images=images, texts=texts, num_samples=5, max_length=256))[0]
    assert got.num_samples == 5 and got.skipped.get("mir_images_unreadable", 0) >= 1
    pixels = {tuple(p.flatten().tolist()) for b in got.batches for p in b["pixel_values"]}
    assert len(pixels) == 5
    with pytest.raises(ValueError, match=r"needs 6 images; fewer .* usable .*mir_images_unreadable': 5"):
        probe(MIRConfig(images=images, texts=texts, num_samples=6, max_length=256))



def test_one_probe_sample_works_while_the_rows_allow_covariances(sources):
    """N = 1 is a valid probe (rows are tokens: 3 image tokens, the text's tokens); a probe with fewer than 2
    vision rows is refused, naming mir.num_samples."""
    images, texts, _, _ = sources
    got, _, image_id = probe(MIRConfig(images=images, texts=texts, num_samples=1, max_length=256))
    (batch,) = got.batches
    assert got.num_samples == 1 and int(batch["vision_mask"].sum()) == TOKENS and int(batch["text_mask"].sum()) >= 2
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    with pytest.raises(ValueError, match=r"1 vision rows .* at least 2: raise mir.num_samples"):
        build_probe(MIRConfig(images=images, texts=texts, num_samples=1, max_length=256), tokenizer=tok,
                    image_transform=image_transform(), image_size=IMAGE_SIZE, tokens_per_image=1,
                    image_token_id=tok.convert_tokens_to_ids("<image>"), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def test_mir_system_prompt_reaches_a_chat_template_only_when_set(sources):
    """Without a template the LLaVA v1 system text is mir.system_prompt; with one, the default leaves the
    template's own and a changed mir.system_prompt becomes its system message (it was dropped silently)."""
    images, texts, _, _ = sources
    cfg = dict(images=images, texts=texts, num_samples=2, max_length=256)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{{ eos_token }}{% endfor %}"

    def ids(**extra):
        out = build_probe(MIRConfig(**cfg, **extra), tokenizer=tok, image_transform=image_transform(),
                          image_size=IMAGE_SIZE, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          tokens_per_image=TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        return tok.decode(out.batches[0]["input_ids"][0])

    default, briefed = ids(), ids(system_prompt="describe the red circle")
    turns = default[default.index("user :"):]                           # the template's own: no system turn
    assert default.count(" : ") == 2 and "describe" not in default
    assert briefed.endswith(turns) and ": describe the red circle </s> user :" in briefed   # one system turn more
    plain = probe(MIRConfig(**cfg, system_prompt="describe the red circle"))
    assert plain[1].decode(plain[0].batches[0]["input_ids"][0]).startswith("<s> describe the red circle user :")
