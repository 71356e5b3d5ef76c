"""Which parts of the LVLM train: freezing as an explicit, logged step.

Owns: applying a ``StageConfig`` — whole parts (vision / connector / LLM / MoCa), partial parts
(vision blocks from k on, LLM decoder layers below k), LoRA adapters (injected by ``lvlm.train.lora``)
— the per-part learning-rate groups, eval mode for frozen parts, the trainable-parameter table printed
at start, and the first-step gradient check (every unit meant to train got a gradient; no frozen one
did). Assumes the model has ``vision``, ``connector``, ``llm`` and optional ``moca`` attributes.
"""
from __future__ import annotations

import torch
from torch import nn

from lvlm.config.schema import Config, StageConfig
from lvlm.train.lora import uses_lora


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    if getattr(model, "moca", None) is not None:
        parts["moca"] = model.moca
    return parts


def _trainable_units(model: nn.Module, stage: StageConfig) -> dict[str, list[nn.Parameter]]:
    """The parameters each part trains in this stage (empty list: the part is frozen)."""
    units: dict[str, list[nn.Parameter]] = {}
    vision = model.vision
    if stage.train_vision and stage.vision_from_layer:
        blocks = vision.blocks()
        if stage.vision_from_layer >= len(blocks):
            raise ValueError(f"stage.vision_from_layer {stage.vision_from_layer} leaves nothing to train: the encoder "
                             f"runs {len(blocks)} blocks (valid: 0..{len(blocks) - 1})")
        first = {id(p) for p in blocks[stage.vision_from_layer].parameters()}
        params, started = [], False
        for p in vision.parameters():  # registration order: embeddings, blocks, post-norm/projection
            started = started or id(p) in first
            if started:
                params.append(p)
        units["vision"] = params
    else:
        units["vision"] = list(vision.parameters()) if stage.train_vision else []
    units["connector"] = list(model.connector.parameters()) if stage.train_connector else []
    llm = model.llm
    if not stage.train_llm:
        units["llm"] = []
    elif uses_lora(stage):
        units["llm"] = [p for n, p in llm.named_parameters() if ".lora_" in n]
    elif stage.llm_up_to_layer:
        layers = llm.decoder_layers()
        if stage.llm_up_to_layer > len(layers):
            raise ValueError(f"stage.llm_up_to_layer {stage.llm_up_to_layer} > the LLM's {len(layers)} decoder layers")
        units["llm"] = [p for layer in layers[: stage.llm_up_to_layer] for p in layer.parameters()]
    else:
        units["llm"] = list(llm.parameters())
    if getattr(model, "moca", None) is not None:
        train_moca = stage.train_connector if stage.train_moca is None else stage.train_moca
        units["moca"] = list(model.moca.parameters()) if train_moca else []
    elif stage.train_moca:
        raise ValueError("stage.train_moca is true but the model has no MoCa (set model.moca true)")
    return units


def apply_stage(model: nn.Module, stage: StageConfig) -> dict[str, bool]:
    """Freeze everything, then unfreeze what this stage trains; returns {part: trains (at least partly)}."""
    units = _trainable_units(model, stage)
    model.requires_grad_(False)
    for params in units.values():
        for p in params:
            p.requires_grad_(True)
    return {name: bool(params) for name, params in units.items()}


def set_train_modes(model: nn.Module, plan: dict[str, bool]) -> None:
    """Frozen parts run in eval mode (no dropout noise into the trained parts)."""
    for name, module in stage_modules(model).items():
        module.train(plan[name])


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups per trained part x (decay, no decay); each with its stage.lr (0 = optim.lr).
    No weight decay on biases, norms and MoCa's vectors (ndim < 2)."""
    groups = []
    for name, module in stage_modules(model).items():
        lr = getattr(cfg.stage.lr, name) or cfg.optim.lr
        trained = [p for p in module.parameters() if p.requires_grad]
        for decay, params in ((cfg.optim.weight_decay, [p for p in trained if p.ndim >= 2]),
                              (0.0, [p for p in trained if p.ndim < 2])):
            if params:
                groups.append({"params": params, "weight_decay": decay, "lr": lr, "name": name})
    return groups


def parameter_table(model: nn.Module) -> str:
    """A fixed-width table of total and trainable parameters per part."""
    rows = [("module", "parameters", "trainable", "class")]
    total = trainable = 0
    for name, module in stage_modules(model).items():
        n = sum(p.numel() for p in module.parameters())
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        cls = type(getattr(module, "model", module)).__name__
        rows.append((name, f"{n:,}", f"{t:,}", cls))
        total, trainable = total + n, trainable + t
    rows.append(("total", f"{total:,}", f"{trainable:,}", f"{100.0 * trainable / max(total, 1):.2f}% trainable"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _units_for_check(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Check units: each decoder layer / encoder block on its own, the rest of each part as one unit."""
    units: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for part, module in stage_modules(model).items():
        blocks = {"llm": model.llm.decoder_layers(), "vision": model.vision.blocks()}.get(part)
        owner = {}
        if blocks is not None:
            for i, block in enumerate(blocks):
                for p in block.parameters():
                    owner[id(p)] = f"{part} layer {i}"
        for name, p in module.named_parameters():
            unit = owner.get(id(p), part)
            if ".lora_" in name:
                unit += " (LoRA)"
            units.setdefault(unit, []).append((f"{part}.{name}", p))
    return units


def check_gradients(model: nn.Module, plan: dict[str, bool], full_grad) -> None:
    """After the first backward, before the optimizer step: raise if a unit meant to train (a part, or each
    decoder layer / encoder block of a partly trained part) got no gradient, or a frozen parameter got one.
    ``full_grad(p)`` returns a parameter's (gathered) gradient or None; ``plan`` is apply_stage's result."""
    for part, module in stage_modules(model).items():
        if plan.get(part) and not any(p.requires_grad for p in module.parameters()):
            raise RuntimeError(f"stage trains '{part}' but none of its parameters is trainable")
    for unit, named in _units_for_check(model).items():
        trained = [p for _, p in named if p.requires_grad]
        if trained and not any((g := full_grad(p)) is not None and bool(torch.any(g != 0)) for p in trained):
            raise RuntimeError(f"stage trains '{unit}' but it received no gradient on the first step: check that "
                               "its output reaches the loss (e.g. model.vision.feature_layer below a trained block)")
        leaked = [n for n, p in named if not p.requires_grad and p.grad is not None]
        if leaked:
            raise RuntimeError(f"stage freezes '{unit}' but {len(leaked)} of its parameters received gradients "
                               f"(e.g. {leaked[0]})")
