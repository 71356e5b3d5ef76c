"""Questions about a scene with one right answer: the toy SFT data and the toy downstream benchmark.

Owns: the four question types and their templates, the uniqueness rule, and the files
``vqa/train.json`` / ``vqa/val.json`` plus ``vqa/images/{train,val}/KEY.jpg`` of a world, and the
text-only QA documents the toy LLM is pre-trained on.

* ``colour``: "what colour is the circle?" / "what colour are the squares?" -> "red"
* ``shape``: "what shape is the red object?" / "... are the red objects?" -> "circle"
* ``count``: "how many blue triangles are there?" -> "two"
* ``position``: "where is the green diamond?" -> a canonical cell name of ``scene.POSITIONS`` ("top left")

Uniqueness rule: a question is asked only when its referring expression (a shape; a colour; a colour
and a shape) matches exactly one group of the scene, so its answer is unique. The JSON files are
LLaVA-style records ``{id, image, type, conversations: [{from: human, value: "<image>\\n" + question},
{from: gpt, value: answer}]}`` read by ``lvlm.data.sources.llava_json`` (json_path + image_folder
``vqa/images``). Train: ``per_image`` questions of distinct types per TRAIN image (types and questions
drawn from ``sample_rng(seed, "vqa-train", i)``). Val (the benchmark): up to ``val_per_type`` questions
per type over the VAL images, drawn per type from ``default_rng([seed, SPLIT_IDS["vqa-val"], type index])``,
ordered by image, then type, so any prefix is roughly balanced.

Assumes: it is handed the world's caption samples as ``lvlm.toy.world`` writes them (so the VQA images
are byte-identical to the caption images, and their scenes are read from the samples' metadata); all
words are in ``scene.vocabulary()`` (which includes ``TEMPLATE_WORDS``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvlm.toy.scene import COUNT_WORDS, Group, Scene, caption, sample_scene
from lvlm.toy.world import SPLIT_IDS, sample_rng, sha256_file

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")
TEMPLATE_WORDS: tuple[str, ...] = ("what", "colour", "shape", "is", "are", "the", "object", "objects", "how",
                                   "many", "there", "where", "?")
"""Every word the question templates below use besides shapes and colours."""
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Question:
    type: str
    """One of QUESTION_TYPES."""
    text: str
    answer: str


def _plural(word: str, count: int) -> str:
    return word if count == 1 else word + "s"


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _matches(scene: Scene, shape: str | None = None, colour: str | None = None) -> list[Group]:
    return [g for g in scene.groups if (shape is None or g.shape == shape) and (colour is None or g.colour == colour)]


def questions(scene: Scene) -> list[Question]:
    """Every question with a unique answer about ``scene``: by type (QUESTION_TYPES order), then group."""
    out: list[Question] = []
    for g in scene.groups:
        if len(_matches(scene, shape=g.shape)) == 1:
            out.append(Question("colour", f"what colour {_be(g.count)} the {_plural(g.shape, g.count)}?", g.colour))
    for g in scene.groups:
        if len(_matches(scene, colour=g.colour)) == 1:
            noun = _plural("object", g.count)
            out.append(Question("shape", f"what shape {_be(g.count)} the {g.colour} {noun}?", g.shape))
    for g in scene.groups:
        if len(_matches(scene, shape=g.shape, colour=g.colour)) == 1:
            out.append(Question("count", f"how many {g.colour} {g.shape}s are there?", COUNT_WORDS[g.count - 1]))
    for g in scene.groups:
        if len(_matches(scene, shape=g.shape, colour=g.colour)) == 1:
            noun = _plural(g.shape, g.count)
            out.append(Question("position", f"where {_be(g.count)} the {g.colour} {noun}?", g.position))
    return out


def pick_questions(scene: Scene, rng: np.random.Generator, k: int) -> list[Question]:
    """Up to ``k`` questions of distinct types, types drawn uniformly from those the scene allows."""
    by_type: dict[str, list[Question]] = {}
    for q in questions(scene):
        by_type.setdefault(q.type, []).append(q)
    types = [t for t in QUESTION_TYPES if t in by_type]
    chosen = sorted(rng.choice(len(types), size=min(k, len(types)), replace=False))
    return [by_type[types[i]][int(rng.integers(0, len(by_type[types[i]])))] for i in chosen]


def record(rid: str, image: str, q: Question) -> dict:
    """One LLaVA-style record (the schema of ``lvlm.data.sources.llava_json``) plus its ``type``."""
    return {"id": rid, "image": image, "type": q.type,
            "conversations": [{"from": "human", "value": f"{IMAGE_MARKER}\n{q.text}"},
                              {"from": "gpt", "value": q.answer}]}


def scene_from_meta(meta: dict) -> Scene:
    """The scene of a caption sample's ``KEY.json`` (``objects``: shape, color, count, row, col)."""
    return Scene(tuple(Group(o["shape"], o["color"], int(o["count"]), 3 * int(o["row"]) + int(o["col"]))
                       for o in meta["objects"]))


def _write_images(samples: list[dict], split: str, out: Path) -> list[tuple[str, Scene]]:
    """Write the images of caption samples (``make_sample`` dicts) to ``out/<split>/KEY.jpg``; (path relative
    to ``out``, scene) per image."""
    (out / split).mkdir(parents=True, exist_ok=True)
    images = []
    for sample in samples:
        rel = f"{split}/{sample['__key__']}.jpg"
        (out / rel).write_bytes(sample["jpg"])
        images.append((rel, scene_from_meta(json.loads(sample["json"]))))
    return images


def write_vqa(world_dir: Path | str, seed: int, samples: dict[str, list[dict]], per_image: int = 2,
              val_per_type: int = 100) -> dict:
    """Write ``vqa/{train,val}.json`` and ``vqa/images/`` under a world, given the caption samples of its
    "train" and "val" splits (``world.make_sample`` dicts, in order); returns the manifest entry."""
    out = Path(world_dir) / "vqa"
    train_images = _write_images(samples["train"], "train", out / "images")
    val_images = _write_images(samples["val"], "val", out / "images")
    train = []
    for i, (image, scene) in enumerate(train_images):
        for j, q in enumerate(pick_questions(scene, sample_rng(seed, "vqa-train", i), per_image)):
            train.append(record(f"vqa-train-{i:06d}-{j}", image, q))
    val: list[tuple[int, int, dict]] = []
    for t, qtype in enumerate(QUESTION_TYPES):
        pool = [(i, q) for i, (_, scene) in enumerate(val_images) for q in questions(scene) if q.type == qtype]
        rng = np.random.default_rng([seed, dict(SPLIT_IDS)["vqa-val"], t])
        for n in sorted(rng.choice(len(pool), size=min(val_per_type, len(pool)), replace=False)):
            i, q = pool[n]
            val.append((i, t, record(f"vqa-val-{i:06d}-{qtype}-{n:04d}", val_images[i][0], q)))
    val_records = [r for _, _, r in sorted(val, key=lambda v: (v[0], v[1]))]
    entry = {"image_folder": "vqa/images", "images": len(train_images) + len(val_images)}
    for name, records in (("train", train), ("val", val_records)):
        path = out / f"{name}.json"
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
        counts = {t: sum(r["type"] == t for r in records) for t in QUESTION_TYPES}
        entry[name] = {"name": f"vqa/{name}.json", "records": len(records), "per_type": counts,
                       "sha256": sha256_file(path)}
    return entry


def qa_messages(seed: int, n: int, turns: int = 3) -> list[list[dict]]:
    """``n`` text-only QA chats for the toy LLM about scenes that are never rendered: the first user turn is
    the scene's caption followed by a question, every assistant turn an answer, then up to ``turns - 1``
    further questions of other types. Chat ``i`` is drawn from ``sample_rng(seed, "text-qa", i)`` alone."""
    chats = []
    for i in range(n):
        rng = sample_rng(seed, "text-qa", i)
        scene = sample_scene(rng)
        text, _ = caption(scene, rng)
        qs = pick_questions(scene, rng, turns)
        order = rng.permutation(len(qs))
        chat: list[dict] = []
        for k, j in enumerate(order):
            chat += [{"role": "user", "content": f"{text} {qs[j].text}" if k == 0 else qs[j].text},
                     {"role": "assistant", "content": qs[j].answer}]
        chats.append(chat)
    return chats
