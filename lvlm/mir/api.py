"""MIR of a checkpoint, outside training: build from config, load trained weights, probe, report."""
from __future__ import annotations

from pathlib import Path

import torch

from lvlm.config.schema import Config
from lvlm.mir.collect import probe_mir
from lvlm.mir.probe import build_probe
from lvlm.mir.report import write_report


def probe_for(cfg: Config, model, image_transform):
    return build_probe(cfg.mir, tokenizer=model.llm.tokenizer, image_transform=image_transform,
                       image_size=model.vision.image_size, image_token_id=model.image_token_id,
                       tokens_per_image=model.tokens_per_image, bos_token_id=model.llm.bos_token_id,
                       eos_token_id=model.llm.eos_token_id, pad_token_id=model.llm.pad_token_id)


def run_mir(cfg: Config, ckpt_dir: Path):
    from lvlm.models.build import build_lvlm
    from lvlm.train.checkpoint import load_trained_weights

    with torch.random.fork_rng():  # as training seeds before building: frozen rows added for <image> match
        torch.manual_seed(cfg.seed)
        model, transform, _ = build_lvlm(cfg.model)
    load_trained_weights(model, ckpt_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    probe = probe_for(cfg, model, transform)
    result = probe_mir(model, probe, model.llm.num_layers, device, cross=cfg.mir.cross,
                       layers_per_pass=cfg.mir.layers_per_pass, memory_gb=cfg.mir.memory_gb)
    paths = write_report(result, ckpt_dir, {"probe_hash": probe.digest, "num_samples": probe.num_samples,
                                            "checkpoint": str(ckpt_dir)})
    return (result, *paths)
