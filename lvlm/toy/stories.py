"""The world's other data kinds: interleaved "stories" and the text corpus as webdataset shards.

Owns: the stories, documents of 2-4 scenes, each an image (rendered like the caption images) followed
by its caption sentence, with short connective text ("and ...", "and in this picture, ...", an
optional opening before the first image and a closing sentence after the last caption), written in
the document layout read by ``lvlm.data.sources.interleaved`` (``KEY.json`` =
``{"segments": [...], "meta": {...}}`` plus members ``KEY.img0.jpg`` ...) as
``stories/train-{000000..000003}.tar`` and ``stories/val-000000.tar``; and the text-only shards
``text/train-{000000..000001}.tar`` (member ``KEY.txt``; the first ``TEXT_SHARD_DOCS`` documents of
``text/train.jsonl``, in order: enough for a text-only stream, and python's tarfile costs ~50 us a
member) read by ``lvlm.data.sources.text``.

Assumes: story ``i`` of a split is drawn from ``world.sample_rng(seed, "stories-<split>", i)`` alone
(split ids of their own, so captions and the text corpus are untouched), and all text uses only the
words of ``lvlm.toy.scene.vocabulary()`` so the toy tokenizer covers it (that is why the connectives
are "and ...", not "next"/"then"). Shard boundaries split the documents evenly; tar members get the
fixed mtime/owner of ``lvlm.toy.world`` (the mtime as an int, which spares a pax header per member).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import webdataset as wds

from lvlm.toy.scene import TEMPLATES, caption, sample_scene
from lvlm.toy.world import TAR_MTIME, read_text, render, sample_rng, sha256_file

STORY_SHARDS: dict[str, int] = {"train": 4, "val": 1}
"""Shards per stories split (fixed, so the shard patterns of a recipe do not depend on the counts)."""
TEXT_SHARDS = 2
TEXT_SHARD_DOCS = 4000
"""At most this many documents of the text corpus go to the text shards."""
SCENES_PER_STORY: tuple[int, int] = (2, 4)
"""Fewest and most scenes (images) of a story."""
OPENING_PROB = 0.5
OPENINGS: tuple[str, ...] = ("what is in this picture?", "describe this image.", "describe the picture briefly.")
LINKS: tuple[str, ...] = ("and", "and in this image,", "and in this picture,")
"""Put before the caption of every scene but the first ("and" alone if the caption names the image)."""
_BARE_TEMPLATES: frozenset[int] = frozenset(
    i for i, t in enumerate(TEMPLATES) if "image" not in t and "picture" not in t)
"""Caption templates that do not say "image"/"picture" themselves (any link reads well before them)."""
CLOSINGS: tuple[str, ...] = ("this is the picture.", "this is the image.", "and this is the image.")
"""Put after the caption of the last scene."""


def default_story_counts(n_train: int, n_val: int) -> tuple[int, int]:
    """A quarter of the caption splits' sizes (1,000 / 50 for the default world), at least one per shard."""
    return max(STORY_SHARDS["train"], n_train // 4), max(STORY_SHARDS["val"], n_val // 4)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def make_story(seed: int, split: str, index: int, key: str, image_size: int = 64) -> dict:
    """One document-layout sample dict (``__key__``, ``json``, ``img0.jpg`` ...), all bytes.

    Segments: [opening text?], then per scene its image and the text after it (link + caption, the
    last one followed by the closing sentence), so images and texts alternate after the opening."""
    rng = sample_rng(seed, f"stories-{split}", index)
    n_scenes = int(rng.integers(SCENES_PER_STORY[0], SCENES_PER_STORY[1] + 1))
    segments: list[dict] = []
    if rng.random() < OPENING_PROB:
        segments.append({"type": "text", "text": _pick(rng, OPENINGS), "role": "assistant"})
    sample: dict = {"__key__": key}
    scenes = []
    for j in range(n_scenes):
        scene = sample_scene(rng)
        sentence, template = caption(scene, rng)
        member = f"img{j}.jpg"
        sample[member] = render(scene, rng, image_size)
        text = sentence
        if j > 0:
            link = _pick(rng, LINKS)  # drawn either way, so the rest of the story does not depend on the template
            text = f"{link if template in _BARE_TEMPLATES else LINKS[0]} {sentence}"
        if j == n_scenes - 1:
            text = f"{text} {_pick(rng, CLOSINGS)}"
        segments += [{"type": "image", "member": member}, {"type": "text", "text": text, "role": "assistant"}]
        scenes.append({"member": member, "caption": sentence, "template": template,
                       "objects": [g.as_dict() for g in scene.groups]})
    meta = {"key": key, "scenes": scenes, "width": image_size, "height": image_size}
    sample["json"] = json.dumps({"segments": segments, "meta": meta}, sort_keys=True).encode("utf-8")
    return sample


def _shard_ranges(n: int, shards: int) -> list[range]:
    """``range(n)`` cut into ``shards`` contiguous, evenly sized pieces (some empty if ``n < shards``)."""
    return [range(s * n // shards, (s + 1) * n // shards) for s in range(shards)]


def _write_shards(out: Path, prefix: str, ranges: Iterable[range], make: Callable[[int], dict]) -> list[dict]:
    """Write ``out/<prefix>-NNNNNN.tar`` per range, samples ``make(i)``; manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, indices in enumerate(ranges):
        path = out / f"{prefix}-{shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=int(TAR_MTIME), user="lvlm", group="lvlm") as sink:
            for i in indices:
                sink.write(make(i))
        tmp.replace(path)
        entries.append({"name": f"{out.name}/{path.name}", "samples": len(indices), "sha256": sha256_file(path)})
    return entries


def write_stories(out: Path, split: str, n: int, seed: int, image_size: int = 64) -> list[dict]:
    """``n`` stories of ``split`` ("train" or "val") as ``out/<split>-NNNNNN.tar``; keys ``story-<split>-NNNNNN``."""
    return _write_shards(out, split, _shard_ranges(n, STORY_SHARDS[split]),
                         lambda i: make_story(seed, split, i, f"story-{split}-{i:06d}", image_size))


def write_text_shards(world_dir: Path) -> list[dict]:
    """The first ``TEXT_SHARD_DOCS`` documents of ``text/train.jsonl`` as ``text/train-NNNNNN.tar``
    (``KEY.txt``, keys ``text-NNNNNN`` = line index)."""
    texts = read_text(world_dir)[:TEXT_SHARD_DOCS]
    return _write_shards(Path(world_dir) / "text", "train", _shard_ranges(len(texts), TEXT_SHARDS),
                         lambda i: {"__key__": f"text-{i:06d}", "txt": texts[i].encode("utf-8")})


def write_extras(world_dir: Path, seed: int, n_stories: int, n_stories_val: int, image_size: int) -> dict:
    """Stories and text shards under ``world_dir``; the manifest entries ``stories`` and ``text_shards``."""
    world = Path(world_dir)
    stories = {split: {"samples": n, "shards": write_stories(world / "stories", split, n, seed, image_size)}
               for split, n in (("train", n_stories), ("val", n_stories_val))}
    text = write_text_shards(world)
    return {"stories": stories, "text_shards": {"samples": sum(s["samples"] for s in text), "shards": text}}
