"""Pre-training of the toy backbones on the synthetic world, saved in their real formats.

Owns: the toy LLM (a tiny Llama trained with next-token cross-entropy on the world's text corpus plus
text-only QA chats, saved with ``save_pretrained`` together with the toy tokenizer) and the toy vision encoder (a tiny
open_clip CLIP trained contrastively with open_clip's ``ClipLoss`` on the world's image-caption
pairs, saved as an ``open_clip_config.json``-style JSON plus a safetensors state dict). Both are
loaded back by the same loaders as real backbones (``lvlm.models``).

Assumes a world written by ``lvlm.toy.world.write_world``; everything is seeded.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lvlm.toy.tokenizer import build_tokenizer
from lvlm.toy.vqa import qa_messages
from lvlm.toy.world import read_split, read_text

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LLMSpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 344
    steps: int = 300
    batch: int = 64
    lr: float = 3e-3
    qa_fraction: float = 0.5
    """Text-only QA chats (``lvlm.toy.vqa.qa_messages``: a scene's caption and a question, the answer, two
    more questions and answers, in the toy chat template) added to the corpus, as a fraction of its document
    count; 0 = the text corpus alone."""
    qa_eval: int = 200
    """Held-out QA chats whose first question the trained LLM answers greedily (``qa_accuracy`` in the report)."""


@dataclass(frozen=True)
class VisionSpec:
    width: int = 128
    layers: int = 4
    heads: int = 4
    patch: int = 8
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    context: int = 40
    steps: int = 300
    batch: int = 128
    lr: float = 2e-3


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _pad(rows: list[list[int]], length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = torch.tensor(r)
    return out


def _chat_ids(tok, chat: list[dict], generation_prompt: bool = False) -> list[int]:
    """BOS + the chat rendered by the toy chat template (assistant turns end with EOS)."""
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    return [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]


def train_llm(world: Path, out: Path, spec: LLMSpec, seed: int = 0) -> dict:
    """Train the toy LLM on the world's text corpus plus QA chats; save model + tokenizer to ``out``.

    The QA chats teach it what an instruction-tuned LLM brings to LLaVA-style training: answering a
    question about a scene described earlier in its context (later: shown as image tokens)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    texts = read_text(world)
    ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids, tok.eos_token_id] for t in texts]
    n_qa = int(round(spec.qa_fraction * len(texts)))
    chats = qa_messages(seed, n_qa + spec.qa_eval)
    ids += [_chat_ids(tok, chat) for chat in chats[:n_qa]]
    length = max(len(r) for r in ids)
    data = _pad(ids, length, tok.pad_token_id)  # [n, length]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine(step, spec.steps, max(1, spec.steps // 20))
        batch = data[torch.randint(0, len(data), (spec.batch,), generator=gen)]
        labels = batch.masked_fill(batch == tok.pad_token_id, -100)
        loss = model(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    held_out = chats[n_qa:]
    return {"params": sum(p.numel() for p in model.parameters()), "steps": spec.steps, "documents": len(texts),
            "qa_documents": n_qa, "first_loss": float(np.mean(losses[:10])),
            "final_loss": float(np.mean(losses[-10:])), "qa_accuracy": qa_accuracy(model, tok, held_out),
            "qa_eval": len(held_out), "seconds": seconds, "spec": asdict(spec)}


@torch.no_grad()
def qa_accuracy(model, tok, chats: list[list[dict]], max_new_tokens: int = 4) -> float:
    """Exact-match accuracy of greedy answers to the first user turn of each of ``chats`` (nan if none)."""
    if not chats:
        return float("nan")
    model.eval()
    prompts = [_chat_ids(tok, chat[:1], generation_prompt=True) for chat in chats]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # left-padded [n, width]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    answers: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        mask = (ids != tok.pad_token_id).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)  # [n]
        for i, t in enumerate(nxt.tolist()):
            if not done[i] and t != tok.eos_token_id:
                answers[i].append(t)
        done |= nxt == tok.eos_token_id
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    model.train()
    hits = [tok.decode(a).strip() == chat[1]["content"] for a, chat in zip(answers, chats)]
    return float(np.mean(hits))


def open_clip_config(spec: VisionSpec, image_size: int, vocab: int) -> dict:
    """open_clip_config.json layout: the model config plus the preprocessing the weights were trained with."""
    return {
        "model_cfg": {
            "embed_dim": spec.embed_dim,
            "vision_cfg": {"image_size": image_size, "patch_size": spec.patch, "width": spec.width,
                           "layers": spec.layers, "head_width": spec.width // spec.heads, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": spec.context, "vocab_size": vocab, "width": spec.text_width,
                         "heads": max(1, spec.text_width // 32), "layers": spec.text_layers, "pool_type": "last"},
        },
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "image_size": image_size},
    }


def _images(world: Path, split: str) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = [], []
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for _, jpg, caption, _ in read_split(world, split):
        with Image.open(io.BytesIO(jpg)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        pixels.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
        captions.append(caption)
    return torch.stack(pixels), captions


def _text_ids(tok, captions: list[str], context: int) -> torch.Tensor:
    # "last" pooling under a causal mask: the final position sees the whole caption; keep EOS last.
    rows = [tok(c, add_special_tokens=False).input_ids[: context - 1] for c in captions]
    return torch.stack([torch.tensor([tok.pad_token_id] * (context - 1 - len(r)) + r + [tok.eos_token_id])
                        for r in rows])  # left-padded: [n, context]


@torch.no_grad()
def retrieval_top1(model, pixels: torch.Tensor, text: torch.Tensor) -> float:
    """Image -> text top-1 accuracy among the given pairs."""
    model.eval()
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(text), dim=-1)
    model.train()
    return float(((img @ txt.T).argmax(-1) == torch.arange(len(img))).float().mean())


def train_vision(world: Path, out: Path, spec: VisionSpec, image_size: int, seed: int = 0) -> dict:
    """Contrastive pre-training of the toy CLIP; saves model_config.json + open_clip_model.safetensors."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = open_clip_config(spec, image_size, vocab=len(tok))
    model = open_clip.CLIP(**cfg["model_cfg"])
    pixels, captions = _images(world, "train")
    text = _text_ids(tok, captions, spec.context)
    val_pixels, val_captions = _images(world, "val")
    val_text = _text_ids(tok, val_captions, spec.context)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine(step, spec.steps, max(1, spec.steps // 10))
        idx = torch.randint(0, len(pixels), (spec.batch,), generator=gen)
        img_f, txt_f, scale = model(pixels[idx], text[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    n_val = min(len(val_pixels), 100)
    top1 = retrieval_top1(model, val_pixels[:n_val], val_text[:n_val])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return {"params_visual": sum(p.numel() for p in model.visual.parameters()), "steps": spec.steps,
            "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:])),
            "val_top1": top1, "val_chance": 1.0 / n_val, "seconds": time.perf_counter() - t0, "spec": asdict(spec)}
