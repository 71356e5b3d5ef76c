"""LoRA on the LLM through peft: injection, merged weights, and adapters in peft's own format.

Owns: injecting adapters in place (``peft.inject_adapter_in_model``: parameter names stay the plain
model's plus ``base_layer`` / ``lora_A`` / ``lora_B``), the mapping back to plain names, the merged
weight of each adapted layer (peft's ``get_delta_weight``), and the adapter directory written next to
a checkpoint: ``adapter_config.json`` + ``adapter_model.safetensors`` keyed as a ``PeftModel`` saves
them (``base_model.model.<module>.lora_A.weight``), so ``PeftModel.from_pretrained(llm, DIR)`` loads it
onto the plain transformers LLM, and ``load_adapter`` loads it back into an LVLM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lvlm.config.schema import StageConfig

ADAPTER = "default"  # peft's adapter name
ADAPTER_DIR = "lora_adapter"
_PEFT_PREFIX = "base_model.model."


def uses_lora(stage: StageConfig) -> bool:
    return stage.train_llm and stage.lora.r > 0


def lora_config(stage: StageConfig, num_layers: int):
    from peft import LoraConfig

    k = stage.llm_up_to_layer
    if k > num_layers:
        raise ValueError(f"stage.llm_up_to_layer {k} > the LLM's {num_layers} decoder layers")
    lc = stage.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      layers_to_transform=list(range(k)) if k else None, bias="none")


def add_lora(model: nn.Module, stage: StageConfig) -> None:
    """Inject LoRA adapters into the LLM of an LVLM (before the optimizer is built). No-op without LoRA."""
    if uses_lora(stage):
        inject(model.llm.model, lora_config(stage, len(model.llm.decoder_layers())))


def inject(hf_model: nn.Module, config) -> None:
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, hf_model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in hf_model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"stage.lora.target_modules {sorted(config.target_modules)} do not match this LLM ({e}); "
                         f"its linear layers are named: {', '.join(names)}") from e


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Adapted layers by module name (empty when peft was never used)."""
    if not any(".lora_" in n for n, _ in module.named_parameters()):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def plain_name(name: str) -> str:
    """The parameter's name in the model without adapters."""
    return name.replace(".base_layer.", ".")


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """base weight + (alpha / r) B A of one adapted layer, fp32 on CPU (parameters must be gathered)."""
    base = layer.get_base_layer().weight
    return (base.detach().float() + layer.get_delta_weight(ADAPTER).detach().float()).cpu()


def adapter_tensors(layer_name: str, layer: nn.Module, llm_prefix: str = "llm.model.") -> dict[str, torch.Tensor]:
    """One adapted layer's LoRA tensors under PeftModel's key names (parameters must be gathered)."""
    if not layer_name.startswith(llm_prefix):
        raise ValueError(f"LoRA layer {layer_name} is outside the LLM ({llm_prefix})")
    out = {}
    for name, p in layer.named_parameters():
        if name.startswith("lora_"):
            key = f"{layer_name[len(llm_prefix):]}.{name}".replace(f".{ADAPTER}.", ".")
            out[_PEFT_PREFIX + key] = p.detach().float().cpu().clone()
    return out


def save_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], stage: StageConfig, num_layers: int,
                 base_model: str = "") -> Path:
    from safetensors.torch import save_file

    path = Path(out_dir) / ADAPTER_DIR
    path.mkdir(parents=True, exist_ok=True)
    config = lora_config(stage, num_layers)
    config.base_model_name_or_path = base_model or None
    config.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def load_adapter(model: nn.Module, ckpt_dir: Path) -> bool:
    """Inject the adapters saved under ``ckpt_dir/lora_adapter`` into an LVLM and load them; False if none."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        return False
    config = LoraConfig.from_pretrained(str(path))
    inject(model.llm.model, config)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        module_path, kind, leaf = key[len(_PEFT_PREFIX):].rsplit(".", 2)
        name = f"llm.model.{module_path}.{kind}.{ADAPTER}.{leaf}"
        if name not in params:
            raise ValueError(f"{path}: adapter tensor {key} matches no parameter of this model ({name})")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    return True


def merge_into_base(model: nn.Module) -> list[str]:
    """Fold every adapter into its layer's weight and put the plain layer back; returns the merged weights'
    names (plain model naming)."""
    merged = []
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        with torch.no_grad():
            base.weight.copy_(merged_weight(layer).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
        merged.append(f"{name}.weight")
    return merged
