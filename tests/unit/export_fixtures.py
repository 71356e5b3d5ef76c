"""Fake training runs for export tests: a tiny LVLM (random HF vision tower + tiny Llama, both saved and
loaded back by path), non-trivial connector weights, and a run directory laid out as training writes
it (``config.yaml`` from ``dump_config``; ``checkpoints/step_XXXXXXXX/`` with ``trainable.safetensors``
and ``COMPLETE``; ``checkpoints/latest``). Also model inputs with N placeholder tokens per image."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from model_fixtures import save_llm
from model_fixtures import tokenizer as word_tokenizer
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from vision_fixtures import save_hf

from lvlm.config import Config, HFVisionConfig, LLMConfig, MLPConnectorConfig, ModelConfig, dump_config
from lvlm.config.schema import ConnectorConfig, VisionConfig
from lvlm.models.build import build_lvlm
from lvlm.train.checkpoint import COMPLETE, tag_for

STEP = 7


def save_tied_llama(path: Path) -> None:
    """A tiny Llama whose lm_head is tied to its input embeddings."""
    torch.manual_seed(0)
    tok = word_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)


def backbones(root: Path, vision_kind: str = "clip_vision", llm: str = "llama") -> tuple[str, str]:
    """(vision dir, llm dir) under ``root``, written once; llm: llama, qwen2 or llama_tied."""
    vision, llm_dir = root / vision_kind, root / llm
    if not vision.exists():
        save_hf(vision_kind, vision)
    if not llm_dir.exists():
        save_tied_llama(llm_dir) if llm == "llama_tied" else save_llm(llm, llm_dir)
    return str(vision), str(llm_dir)


def model_config(vision_dir: str, llm_dir: str, connector: ConnectorConfig | None = None, **vision_kw) -> ModelConfig:
    return ModelConfig(vision=HFVisionConfig(name_or_path=vision_dir, **vision_kw),
                       connector=connector or MLPConnectorConfig(depth=2), llm=LLMConfig(name_or_path=llm_dir))


def write_run(run_dir: Path, model_cfg: ModelConfig, trainable: dict[str, torch.Tensor]) -> Path:
    """A run directory with one complete checkpoint holding ``trainable``; returns the checkpoint dir."""
    cfg = Config(model=model_cfg)
    cfg.data.source.shards = "/nonexistent/shards.tar"  # no toy:// left: nothing here needs building
    cfg.mir.images.shards, cfg.mir.texts.files = "/nonexistent/val.tar", "/nonexistent/text.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    ckpt = run_dir / "checkpoints" / tag_for(STEP)
    ckpt.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous() for k, v in trainable.items()}, str(ckpt / "trainable.safetensors"))
    (ckpt / COMPLETE).write_text(json.dumps({"step": STEP}))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(STEP))
    return ckpt


def trained_run(run_dir: Path, model_cfg: ModelConfig, seed: int = 1):
    """Build the model as training does (seeded with the run's seed), give its connector non-trivial
    weights, save the run; returns (model, tokenizer)."""
    torch.manual_seed(Config().seed)
    model, _, tokenizer = build_lvlm(model_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    write_run(run_dir, model_cfg, {f"connector.{k}": v for k, v in model.connector.named_parameters()})
    return model.eval(), tokenizer


def unexportable_run(run_dir: Path, vision: VisionConfig, connector: ConnectorConfig, moca: bool = False) -> Path:
    """A run whose config alone must be refused (its checkpoint holds a dummy tensor)."""
    cfg = ModelConfig(vision=vision, connector=connector, llm=LLMConfig(name_or_path="/nonexistent/llm"), moca=moca)
    write_run(run_dir, cfg, {"connector.dummy": torch.zeros(1)})
    return run_dir


def batch(model, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, one image each, different prompts (the shorter right-padded), plus a row with two images."""
    n, img = model.tokens_per_image, model.image_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + [img] * n + ids("a red circle at the top left"),
            bos + ids("two blue") + [img] * n + ids("square and a green triangle at the bottom right"),
            bos + ids("a") + [img] * n + ids("circle and") + [img] * n + ids("three square .")]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), model.llm.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    size = model.vision.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def max_logit_diff(model, llava, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |logit difference| at the non-padding positions of ``inputs`` (both models in fp32)."""
    with torch.no_grad():
        ours = model(**inputs, return_logits=True).logits
        theirs = llava(**inputs).logits
    keep = inputs["attention_mask"].bool()
    return float((ours[keep].float() - theirs[keep].float()).abs().max())
