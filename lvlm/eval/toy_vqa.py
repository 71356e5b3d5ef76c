"""The toy downstream benchmark: held-out questions about the synthetic world's images, scored by exact match.

Owns: reading the questions (LLaVA-style records with a ``type``, by default the toy world's
``vqa/val.json`` with images in ``vqa/images``, see ``lvlm.toy.vqa``) through the same source as
training (``lvlm.data.sources.llava_json``), building each prompt as the SFT data path does (the
sample's segments before its answer, laid out by ``SampleTokenizer.prompt``: the chat template's generation
prompt, BOS when the LLM takes one, each image as ``tokens_per_image`` placeholders), greedy decoding
of at most ``max_new_tokens`` tokens (stopping at EOS; repeated full forward passes, no KV cache), the
answer normaliser (lowercase, punctuation removed, whitespace collapsed), the scores and ``toy_vqa.json``
next to the checkpoint.

Prompts are batched only with prompts of the same length, so no row is ever padded and a prediction
does not depend on its batch. Assumes the checkpoint's run directory holds the ``config.yaml``
training wrote; the model is rebuilt by ``lvlm.train.checkpoint.load_checkpoint_model``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lvlm.data.sample import Segment, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources.llava_json import LLaVAJsonSource
from lvlm.data.tokenize import SampleTokenizer

DEFAULT_QUESTIONS = "toy://world/vqa/val.json"
REPORT = "toy_vqa.json"
N_EXAMPLES = 8


def normalize(text: str) -> str:
    """Lowercase, punctuation removed (as a word break), whitespace collapsed: " Top-Left." -> "top left"."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def score(rows: list[dict]) -> dict:
    """Accuracy overall and per ``type`` of rows holding ``type``, ``answer`` and ``prediction``."""
    per_type: dict[str, dict] = {}
    for row in rows:
        t = per_type.setdefault(row["type"], {"n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += int(exact_match(row["prediction"], row["answer"]))
    for t in per_type.values():
        t["score"] = t["correct"] / t["n"]
    correct = sum(t["correct"] for t in per_type.values())
    return {"score": correct / len(rows) if rows else float("nan"), "n": len(rows), "correct": correct,
            "per_type": per_type}


@dataclass
class Question:
    id: str
    type: str
    question: str
    answer: str
    prompt: list[Segment]
    """The sample's segments before its answer (image, user question), not yet chat-formatted."""


def load_questions(path: str | Path, image_folder: str | Path | None = None, limit: int = 0) -> list[Question]:
    """The first ``limit`` (0 = all) records of a LLaVA-style JSON file, each with a ``type`` (default
    "all") and a final gpt turn (the answer); images from ``image_folder`` (default: ``images/`` beside it)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent / "images"
    source = LLaVAJsonSource(str(path), str(folder), drop_prompt=False, name="toy_vqa")
    records = source.records[:limit] if limit > 0 else source.records
    wanted = {str(r["id"]) for r in records}
    skips = SkipCounter()
    refs = {ref.key: ref for ref in source.iter_refs(0, 0, skips) if ref.key in wanted}
    missing = [str(r["id"]) for r in records if str(r["id"]) not in refs]
    if missing:
        raise ValueError(f"{path}: {len(missing)} question(s) cannot be asked (first {missing[0]!r}; "
                         f"skipped: {skips.as_dict()}); images are read from {folder}")
    out = []
    for record in records:
        sample = refs[str(record["id"])].load()
        last = max(i for i, s in enumerate(sample.segments) if isinstance(s, TextSegment) and s.role == "assistant")
        user = [s.text for s in sample.segments[:last] if isinstance(s, TextSegment) and s.role == "user"]
        out.append(Question(id=str(record["id"]), type=str(record.get("type", "all")), question=" ".join(user),
                            answer=sample.segments[last].text, prompt=sample.segments[:last]))
    return out


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new_tokens: int,
                  eos_token_id: int | None) -> list[list[int]]:
    """New token ids per row of an unpadded batch ``input_ids`` [B, L], up to (not including) EOS."""
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(out)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, pixel_values=pixel_values, return_logits=True).logits[:, -1]  # [B, V]
        nxt = logits.argmax(-1)  # [B]
        for i, t in enumerate(nxt.tolist()):
            done[i] = done[i] or t == eos_token_id
            if not done[i]:
                out[i].append(t)
        if all(done):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def predict(model, image_transform, questions: list[Question], *, system_prompt: str = "", batch_size: int = 64,
            max_new_tokens: int = 4) -> tuple[list[str], str]:
    """(predicted answer per question, the first prompt as text); batches of equal-length prompts."""
    tok, llm = model.llm.tokenizer, model.llm
    encoder = SampleTokenizer(tok, image_token_id=model.image_token_id, tokens_per_image=model.tokens_per_image,
                              max_length=1 << 30, bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id,
                              system_prompt=system_prompt)
    prompts = [encoder.prompt(q.prompt) for q in questions]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i][0]), i))
    predictions = [""] * len(prompts)
    start = 0
    while start < len(order):
        length = len(prompts[order[start]][0])
        batch = [i for i in order[start:start + batch_size] if len(prompts[i][0]) == length]
        start += len(batch)
        ids = torch.tensor([prompts[i][0] for i in batch], device=device)
        images = [image_transform(img.load()) for i in batch for img in prompts[i][1]]
        pixels = torch.stack(images).to(device) if images else None
        for i, new in zip(batch, greedy_decode(model, ids, pixels, max_new_tokens, llm.eos_token_id)):
            predictions[i] = tok.decode(new, skip_special_tokens=True)
    first = tok.decode(prompts[0][0]) if prompts else ""
    return predictions, first


def evaluate(checkpoint: str | Path, questions: str | Path | None = None, limit: int = 0, device=None, *,
             image_folder: str | Path | None = None, batch_size: int = 64, max_new_tokens: int = 4) -> dict:
    """Score a run directory's newest complete checkpoint (or a checkpoint directory) on the toy VQA
    benchmark (or another LLaVA-style question file); writes and returns ``toy_vqa.json``'s content:
    ``score``, ``n``, ``correct``, ``per_type`` (``n``, ``correct``, ``score`` each), ``examples`` (the first
    few questions with answer and prediction) and ``predictions`` (all of them)."""
    from lvlm import toy
    from lvlm.config import load_config
    from lvlm.train.checkpoint import find_checkpoint, load_checkpoint_model
    from lvlm.train.rundir import config_file

    _, ckpt = find_checkpoint(checkpoint)
    cfg = load_config(config_file(ckpt))
    cfg = dataclasses.replace(cfg, model=toy.resolve_config(cfg.model))
    path = Path(toy.resolve(str(questions) if questions else DEFAULT_QUESTIONS))
    items = load_questions(path, image_folder, limit)
    model, transform = load_checkpoint_model(cfg, ckpt, device)
    predictions, first_prompt = predict(model, transform, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    rows = [{"id": q.id, "type": q.type, "question": q.question, "answer": q.answer, "prediction": p}
            for q, p in zip(items, predictions)]
    result = {**score(rows), "examples": rows[:N_EXAMPLES], "checkpoint": str(ckpt), "questions": str(path),
              "prompt_example": first_prompt, "max_new_tokens": max_new_tokens, "predictions": rows}
    (ckpt / REPORT).write_text(json.dumps(result, indent=2) + "\n")
    return result
