"""The toy downstream benchmark: questions with unique, correct answers; VQA files that lvlm's llava_json
source reads; the evaluator (normaliser, scorer, end to end on a tiny random model) and `lvlm eval`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from export_fixtures import write_run
from transformers import LlamaConfig, LlamaForCausalLM
from vision_fixtures import save_hf

from lvlm.cli.main import main as lvlm_main
from lvlm.config import HFVisionConfig, LLaVAJsonSourceConfig, LLMConfig, MLPConnectorConfig, ModelConfig
from lvlm.data.sample import ImageSegment, Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import build_source
from lvlm.eval.toy_vqa import evaluate, exact_match, load_questions, normalize, predict, score
from lvlm.models.build import build_lvlm
from lvlm.toy.scene import POSITIONS, Group, Scene, sample_scene, split_words, vocabulary
from lvlm.toy.tokenizer import build_tokenizer
from lvlm.toy.vqa import QUESTION_TYPES, pick_questions, qa_messages, questions
from lvlm.toy.world import write_world
from lvlm.train.checkpoint import load_checkpoint_model

WORLD = dict(seed=0, n_train=24, n_val=16, shard_size=8, n_text=10, image_size=32, n_stories=4, n_stories_val=1)


def _qa(scene: Scene) -> dict[str, str]:
    return {q.text: q.answer for q in questions(scene)}


def test_answers_of_a_hand_built_scene():
    scene = Scene((Group("circle", "red", 1, 0), Group("square", "blue", 2, 4), Group("circle", "green", 3, 8)))
    assert _qa(scene) == {
        "what colour are the squares?": "blue",  # circles are two groups: no colour question about them
        "what shape is the red object?": "circle",
        "what shape are the blue objects?": "square",
        "what shape are the green objects?": "circle",
        "how many red circles are there?": "one",
        "how many blue squares are there?": "two",
        "how many green circles are there?": "three",
        "where is the red circle?": "top left",
        "where are the blue squares?": "center",
        "where are the green circles?": "bottom right",
    }
    assert [q.type for q in questions(scene)] == ["colour"] + ["shape"] * 3 + ["count"] * 3 + ["position"] * 3


def test_only_questions_with_a_unique_answer():
    same_colour = Scene((Group("circle", "red", 1, 0), Group("square", "red", 2, 2)))  # never sampled, but allowed
    assert _qa(same_colour) == {"what colour is the circle?": "red", "what colour are the squares?": "red",
                                "how many red circles are there?": "one", "how many red squares are there?": "two",
                                "where is the red circle?": "top left", "where are the red squares?": "top right"}
    twins = Scene((Group("triangle", "blue", 1, 3), Group("triangle", "blue", 3, 5)))
    assert _qa(twins) == {}  # every referring expression matches both groups
    for i in range(300):  # sampled scenes: one answer per question, and every type can be asked but colour
        scene = sample_scene(np.random.default_rng([7, i]))
        qs = questions(scene)
        assert len({q.text for q in qs}) == len(qs)
        assert {"shape", "count", "position"} <= {q.type for q in qs}
        assert all(q.answer in POSITIONS for q in qs if q.type == "position")


def test_every_word_is_in_the_vocabulary():
    words, tok = set(vocabulary()), build_tokenizer()
    for i in range(300):
        for q in questions(sample_scene(np.random.default_rng([3, i]))):
            assert set(split_words(q.text)) | set(split_words(q.answer)) <= words, q
    for chat in qa_messages(0, 50):
        text = tok.apply_chat_template(chat, tokenize=False)
        assert tok.unk_token_id not in tok(text).input_ids, text


def test_toy_chat_template():
    tok = build_tokenizer()
    chat = [{"role": "user", "content": "what colour is the circle?"}, {"role": "assistant", "content": "red"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "user : what colour is the circle? assistant : red</s> "
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "user : what colour is the circle? assistant :"
    ids = tok(tok.apply_chat_template(chat, tokenize=False)).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_questions_are_deterministic():
    scene = sample_scene(np.random.default_rng([0, 5]))
    assert questions(scene) == questions(scene)
    picks = [pick_questions(scene, np.random.default_rng(11), 2) for _ in range(2)]
    assert picks[0] == picks[1] and len({q.type for q in picks[0]}) == 2
    assert qa_messages(0, 20) == qa_messages(0, 20) and qa_messages(0, 20) != qa_messages(1, 20)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vqa_world")
    return out, write_world(out, **WORLD)


def test_vqa_files_are_deterministic(world, tmp_path):
    out, manifest = world
    again = write_world(tmp_path, **WORLD)
    assert again["vqa"] == manifest["vqa"]
    for name in ("train.json", "val.json"):
        assert (out / "vqa" / name).read_bytes() == (tmp_path / "vqa" / name).read_bytes()


def test_vqa_files_are_llava_json(world):
    out, manifest = world
    vqa = manifest["vqa"]
    assert vqa["train"]["records"] == 2 * WORLD["n_train"]  # two questions of distinct types per train image
    val = json.loads((out / "vqa/val.json").read_text())
    counts = Counter(r["type"] for r in val)
    assert set(counts) == set(QUESTION_TYPES) and counts == vqa["val"]["per_type"] and len(val) == len(
        {r["id"] for r in val})
    assert all(r["image"].startswith("val/") for r in val)
    for name, n in (("train", vqa["train"]["records"]), ("val", len(val))):
        cfg = LLaVAJsonSourceConfig(json_path=str(out / f"vqa/{name}.json"), image_folder=str(out / "vqa/images"),
                                    format="chat")
        skips = SkipCounter()
        samples = list(build_source(cfg).iter_samples(seed=0, epoch=0, skips=skips))
        assert skips.total == 0 and len(samples) == n
        for s in samples:
            image, user, answer = s.segments
            assert isinstance(image, ImageSegment) and image.load().size == (32, 32)
            assert isinstance(user, TextSegment) and user.role == "user" and user.text.endswith("?")
            assert isinstance(answer, TextSegment) and answer.role == "assistant"


def test_normalizer_and_scores():
    assert normalize("  Top-Left. ") == "top left" and normalize("RED!") == "red" and normalize("") == ""
    assert exact_match(" red.", "red") and not exact_match("dark red", "red") and not exact_match("", "red")
    rows = [{"type": "colour", "answer": "red", "prediction": "Red"},
            {"type": "colour", "answer": "blue", "prediction": "red"},
            {"type": "count", "answer": "two", "prediction": "two ."},
            {"type": "position", "answer": "top left", "prediction": "top"}]
    result = score(rows)
    assert result["n"] == 4 and result["correct"] == 2 and result["score"] == 0.5
    assert result["per_type"] == {"colour": {"n": 2, "correct": 1, "score": 0.5},
                                  "count": {"n": 1, "correct": 1, "score": 1.0},
                                  "position": {"n": 1, "correct": 0, "score": 0.0}}


def test_prompt_is_the_sft_sample_up_to_its_answer(world):
    """The evaluator asks exactly what SFT trains on: its prompt ids are the tokenized training sample's
    ids up to the first supervised label (the answer)."""
    from lvlm.data.tokenize import SampleTokenizer

    out, _ = world
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    encoder = SampleTokenizer(tok, image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=3,
                              max_length=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for q in load_questions(out / "vqa/val.json", limit=8):
        full = encoder(Sample([*q.prompt, TextSegment(q.answer, role="assistant")]))
        ids, images = encoder.prompt(q.prompt)
        first_label = next(i for i, label in enumerate(full.labels) if label != -100)
        assert ids == full.input_ids[:first_label] and len(images) == 1
        assert tok.decode(full.input_ids[first_label:]) == f"{q.answer} </s>"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run whose model is a random HF vision tower + a random tiny Llama with the toy tokenizer."""
    root = tmp_path_factory.mktemp("vqa_run")
    save_hf("clip_vision", root / "vision")
    torch.manual_seed(0)
    tok = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    cfg = ModelConfig(vision=HFVisionConfig(name_or_path=str(root / "vision")), connector=MLPConnectorConfig(depth=2),
                      llm=LLMConfig(name_or_path=str(root / "llm")))
    torch.manual_seed(0)
    model, _, _ = build_lvlm(cfg)
    write_run(root / "run", cfg, {f"connector.{k}": v for k, v in model.connector.named_parameters()})
    return root / "run"


def test_evaluator_end_to_end(run, world):
    out, _ = world
    path = out / "vqa/val.json"
    result = evaluate(run, questions=path, limit=24)
    assert result["n"] == 24 == sum(t["n"] for t in result["per_type"].values())
    assert result["correct"] == sum(t["correct"] for t in result["per_type"].values())
    assert set(result["per_type"]) <= set(QUESTION_TYPES) and result["score"] <= 0.25  # a random model
    records = json.loads(path.read_text())[:24]
    assert [r["id"] for r in result["predictions"]] == [r["id"] for r in records]
    assert [e["answer"] for e in result["examples"]] == [r["conversations"][1]["value"] for r in records[:8]]
    prompt = result["prompt_example"]  # <s> user : <image> x N, the question, the generation prompt
    assert prompt.startswith("<s> user : <image>") and prompt.endswith("? assistant :"), prompt
    saved = json.loads((Path(result["checkpoint"]) / "toy_vqa.json").read_text())
    assert saved["score"] == result["score"] and saved["n"] == 24


def test_predictions_do_not_depend_on_the_batch(run, world):
    from lvlm.config import load_config

    out, _ = world
    cfg = load_config(run / "config.yaml")
    model, transform = load_checkpoint_model(cfg, next((run / "checkpoints").glob("step_*")), "cpu")
    items = load_questions(out / "vqa/val.json", limit=12)
    one, _ = predict(model, transform, items, batch_size=1, max_new_tokens=3)
    many, _ = predict(model, transform, items, batch_size=64, max_new_tokens=3)
    assert one == many and len(one) == 12


def test_cli(run, world, capsys):
    out, _ = world
    assert lvlm_main(["eval", "toy-vqa", str(run), "--questions", str(out / "vqa/val.json"), "--limit", "8"]) == 0
    printed = capsys.readouterr().out
    assert "type" in printed and "all" in printed and "toy_vqa.json" in printed
    assert lvlm_main(["eval", "toy-vqa", str(run), "--questions", str(out / "nope.json")]) == 2
    assert lvlm_main(["eval", "other", str(run)]) == 2
    assert lvlm_main(["eval", "--help"]) == 0


def test_mir_probe_uses_the_toy_chat_template(world):
    from lvlm.config.schema import MIRConfig, TextSourceConfig, WebDatasetSourceConfig
    from lvlm.mir.probe import build_probe

    out, _ = world
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id, n = tok.convert_tokens_to_ids("<image>"), 4
    cfg = MIRConfig(images=WebDatasetSourceConfig(shards=str(out / "captions/val-000000.tar")),
                    texts=TextSourceConfig(files=str(out / "text/train.jsonl")), num_samples=4, batch_size=4,
                    max_length=256)
    probe = build_probe(cfg, tokenizer=tok, image_transform=lambda im: torch.zeros(3, 32, 32), image_size=32,
                        image_token_id=image_id, tokens_per_image=n, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    batch = probe.batches[0]
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        text = tok.decode(ids)
        assert text.startswith("<s> user : " + " ".join(["<image>"] * n) + " assistant : "), text
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 and tok.unk_token_id not in ids
