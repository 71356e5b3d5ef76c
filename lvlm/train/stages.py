"""Which parts of the LVLM train: freezing as an explicit, logged step.

Owns: applying a ``StageConfig`` (requires_grad per module, eval mode for frozen towers),
the trainable-parameter table printed at start, and the first-step gradient check
(every module meant to train got a gradient; no frozen one did).
"""
from __future__ import annotations

import torch
from torch import nn

from lvlm.config.schema import StageConfig


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    if getattr(model, "moca", None) is not None:
        parts["moca"] = model.moca
    return parts


def apply_stage(model: nn.Module, stage: StageConfig) -> dict[str, bool]:
    """Freeze/unfreeze the parts (MoCa trains with the connector); returns {part: trains}."""
    plan = {"vision": stage.train_vision, "connector": stage.train_connector, "llm": stage.train_llm}
    if "moca" in stage_modules(model):
        plan["moca"] = stage.train_connector
    for name, module in stage_modules(model).items():
        module.requires_grad_(plan[name])
    return plan


def set_train_modes(model: nn.Module, plan: dict[str, bool]) -> None:
    """Frozen parts run in eval mode (no dropout noise into the trained parts)."""
    for name, module in stage_modules(model).items():
        module.train(plan[name])


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


def check_gradients(model: nn.Module, plan: dict[str, bool], full_grad) -> None:
    """After the first backward, before the optimizer step: raise if a trained part has no gradient
    or a frozen part has one. ``full_grad(p)`` returns a parameter's (gathered) gradient or None."""
    for name, module in stage_modules(model).items():
        trained = [full_grad(p) for p in module.parameters() if p.requires_grad]
        has_grad = any(g is not None and bool(torch.any(g != 0)) for g in trained)
        grads = [p.grad for p in module.parameters() if not p.requires_grad and p.grad is not None]
        if plan[name] and not has_grad:
            raise RuntimeError(f"stage trains '{name}' but it received no gradient on the first step: "
                               "check that its output reaches the loss")
        if not plan[name] and grads:
            raise RuntimeError(f"stage freezes '{name}' but {len(grads)} of its parameters received gradients")
