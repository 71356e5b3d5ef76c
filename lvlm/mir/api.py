"""MIR of a checkpoint, outside training: build from config, load trained weights, probe, report."""
from __future__ import annotations

from pathlib import Path

from lvlm.config.schema import Config
from lvlm.mir.collect import probe_mir
from lvlm.mir.probe import build_probe
from lvlm.mir.report import write_report


def probe_for(cfg: Config, model, image_transform):
    """The MIR probe of ``cfg.mir`` for ``model``; ConfigError when the mir.* sources cannot give it (too few
    usable samples, missing files, undecodable images), for training and ``lvlm mir`` alike."""
    try:
        return build_probe(cfg.mir, tokenizer=model.llm.tokenizer, image_transform=image_transform,
                           image_size=model.vision.image_size, image_token_id=model.image_token_id,
                           tokens_per_image=model.tokens_per_image, bos_token_id=model.llm.bos_token_id,
                           eos_token_id=model.llm.eos_token_id, pad_token_id=model.llm.pad_token_id)
    except (ValueError, OSError) as e:
        from lvlm.config import ConfigError

        raise ConfigError(f"MIR probe (mir.*): {e}") from e


def run_mir(cfg: Config, ckpt_dir: Path):
    from lvlm.train.checkpoint import load_checkpoint_model

    model, transform = load_checkpoint_model(cfg, ckpt_dir)  # seeded as training built it
    device = next(model.parameters()).device
    probe = probe_for(cfg, model, transform)
    result = probe_mir(model, probe, model.llm.num_layers, device, cross=cfg.mir.cross,
                       layers_per_pass=cfg.mir.layers_per_pass, memory_gb=cfg.mir.memory_gb)
    paths = write_report(result, ckpt_dir, {"probe_hash": probe.digest, "num_samples": probe.num_samples,
                                            "probe_skipped": probe.skipped, "checkpoint": str(ckpt_dir)})
    return (result, *paths)
