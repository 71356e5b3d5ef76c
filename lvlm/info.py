"""What ``lvlm info`` reports: the software/hardware environment and weightless size and memory estimates.

Owns: package versions, CUDA devices and DeepSpeed op status (``environment``); the parameters of
each part of a configured LVLM and which of them train (``model_sizes``: the model is built by
``build_lvlm`` itself on the meta device, so shapes and counts equal a real build's but no weight is
read or allocated; only configs and tokenizer files are read); per-GPU memory of parameters,
gradients and Adam states for ZeRO stages 0-3 (``zero_memory``) and the text tables (``format_*``).

Memory model (ZeRO paper, Rajbhandari et al. 2020), per GPU, N = data-parallel world size:
parameters take b bytes each (2 with ``train.precision: bf16``, else their dtype's size), gradients
b per trainable parameter, Adam 12 bytes per trainable parameter in mixed precision (fp32 master
copy + two fp32 moments; with fp32 training 2 moments of the parameter's dtype). ZeRO-1 divides the
optimizer states by N, ZeRO-2 also the gradients, ZeRO-3 also the parameters (frozen ones too).
Activations, communication buckets, DeepSpeed's own buffers and the CUDA context are NOT included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from lvlm.config.schema import Config, HFVisionConfig, ModelConfig, OpenCLIPVisionConfig

PACKAGES = (("transformers", "transformers"), ("deepspeed", "deepspeed"), ("open_clip", "open_clip_torch"),
            ("timm", "timm"), ("accelerate", "accelerate"), ("peft", "peft"), ("flash_attn", "flash-attn"))
"""(shown name, distribution name) of the packages whose versions are reported."""
DS_OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder", "AsyncIOBuilder")
"""DeepSpeed op builders whose status is reported (those the current accelerator lacks are left out)."""
GIB = 1024**3


@dataclass(frozen=True)
class OpStatus:
    builder: str
    name: str
    compatible: bool
    """The op can be built here (``is_compatible``): its compiler and library needs are met."""
    prebuilt: bool
    """Compiled into the installed DeepSpeed wheel (DS_BUILD_OPS)."""
    jit_cached: bool
    """Already JIT-compiled in the torch extensions cache: loads without compiling."""


def versions() -> dict[str, str]:
    """Python, torch, CUDA and the key packages' versions ("not installed" when absent)."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda (torch build)": torch.version.cuda or "none (CPU build)",
           "cuda available": str(torch.cuda.is_available())}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for shown, dist in PACKAGES:
        try:
            out[shown] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[shown] = "not installed"
    return out


def devices() -> list[dict[str, Any]]:
    """One entry per visible CUDA device: index, name, memory (bytes), compute capability."""
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory": int(p.total_memory), "capability": f"{p.major}.{p.minor}"})
    return out


def _import_deepspeed():
    """Import deepspeed with its import-time chatter (accelerator detection) kept off stdout."""
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        import deepspeed
        from deepspeed.utils import logger
    for handler in logger.handlers:  # its handler captured the redirected stream at creation: point it back
        if getattr(handler, "stream", None) is sink:
            handler.setStream(sys.stdout)
    return deepspeed


def _jit_cached(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return os.path.isfile(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))
    except Exception:  # private torch helper: treat any change as "unknown = no"
        return False


def deepspeed_ops() -> tuple[str, list[OpStatus]]:
    """(DeepSpeed accelerator name, status of each ``DS_OPS`` builder the accelerator has)."""
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    acc, out = get_accelerator(), []
    for builder_name in DS_OPS:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink):
                builder = acc.create_op_builder(builder_name)
                if builder is None or type(builder).__name__ == "NotImplementedBuilder":
                    continue
                compatible = bool(builder.is_compatible(False))
        except Exception:  # a probe that fails (e.g. CUDA without toolkit) means "cannot be built here"
            builder, compatible = None, False
        if builder is None:
            continue
        prebuilt = bool(installed_ops.get(builder.name, False)) and accelerator_name == acc._name
        out.append(OpStatus(builder_name, builder.name, compatible, prebuilt, _jit_cached(builder.name)))
    return acc._name, out


def format_environment(vers: dict[str, str], devs: list[dict[str, Any]], accelerator: str,
                       ops: list[OpStatus]) -> str:
    from torch.utils.cpp_extension import is_ninja_available

    width = max(len(k) for k in vers)
    lines = ["== versions ==", *(f"{k.ljust(width)} : {v}" for k, v in vers.items()), "", "== devices =="]
    lines += [f"cuda:{d['index']}  {d['name']}  {d['memory'] / GIB:.1f} GiB  (sm {d['capability']})" for d in devs]
    lines.append(f"{len(devs)} CUDA device(s); {os.cpu_count()} CPU cores")
    lines += ["", f"== DeepSpeed ops (accelerator: {accelerator}; ninja for JIT: "
              f"{'yes' if is_ninja_available() else 'NO'}) =="]
    rows = [("op", "builder", "compatible", "prebuilt", "JIT-cached")]
    rows += [(o.name, o.builder, _yn(o.compatible), _yn(o.prebuilt), _yn(o.jit_cached)) for o in ops]
    lines += _table(rows)
    lines.append("compatible ops not prebuilt or cached are JIT-compiled on first use (about a minute each)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- model size


@dataclass(frozen=True)
class PartSize:
    """One part of the LVLM: parameter counts, and bytes of the parameters as trained."""

    name: str
    cls: str
    params: int
    trainable: int
    param_bytes: int
    """Bytes of all its parameters (2 per parameter with bf16 training, else each one's dtype size)."""
    grad_bytes: int
    """Bytes of the gradients of its trainable parameters (same dtype as the parameters)."""
    optim_bytes: int
    """Bytes of Adam states of its trainable parameters (12 per parameter with bf16 mixed precision)."""


def weightless(model: ModelConfig) -> ModelConfig:
    """The same architecture with nothing to download or read but configs: random init, no pretrained tag,
    a kernel that needs no extra package (attention kernels hold no parameters)."""
    vision = model.vision
    if isinstance(vision, HFVisionConfig):
        vision = dataclasses.replace(vision, random_init=True)
    elif isinstance(vision, OpenCLIPVisionConfig):
        vision = dataclasses.replace(vision, pretrained="")
    llm = dataclasses.replace(model.llm, random_init=True, attn_implementation="sdpa")
    return dataclasses.replace(model, vision=vision, llm=llm)


def model_sizes(cfg: Config) -> list[PartSize]:
    """Per part: parameters and trainable parameters under ``cfg.stage``, built on the meta device the way
    ``lvlm train`` builds it (LoRA adapters injected, then the stage applied), so the counts equal its table."""
    from lvlm.models.build import build_lvlm
    from lvlm.train.lora import add_lora
    from lvlm.train.stages import apply_stage, stage_modules

    with torch.device("meta"):
        model, _, _ = build_lvlm(weightless(cfg.model))
        add_lora(model, cfg.stage)
    apply_stage(model, cfg.stage)
    mixed = cfg.train.precision == "bf16"

    def size(p: torch.Tensor) -> int:
        return p.numel() * (2 if mixed else p.element_size())

    def optim(p: torch.Tensor) -> int:
        return p.numel() * (12 if mixed else 2 * p.element_size())

    out = []
    for name, module in stage_modules(model).items():
        params = list(module.parameters())
        trained = [p for p in params if p.requires_grad]
        out.append(PartSize(name, type(getattr(module, "model", module)).__name__, sum(p.numel() for p in params),
                            sum(p.numel() for p in trained), sum(map(size, params)), sum(map(size, trained)),
                            sum(map(optim, trained))))
    return out


@dataclass(frozen=True)
class ZeroMemory:
    stage: int
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def zero_memory(parts: list[PartSize], world_size: int) -> list[ZeroMemory]:
    """Bytes per GPU for ZeRO stages 0-3; a partitioned quantity is ceil(bytes / world_size)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    p = sum(x.param_bytes for x in parts)
    g = sum(x.grad_bytes for x in parts)
    o = sum(x.optim_bytes for x in parts)

    def split(n: int) -> int:
        return -(-n // world_size)

    return [ZeroMemory(0, p, g, o), ZeroMemory(1, p, g, split(o)), ZeroMemory(2, p, split(g), split(o)),
            ZeroMemory(3, split(p), split(g), split(o))]


def format_model(parts: list[PartSize], mem: list[ZeroMemory], cfg: Config, world_size: int) -> str:
    s = cfg.stage
    rows = [("part", "class", "parameters", "trainable")]
    rows += [(x.name, x.cls, f"{x.params:,}", f"{x.trainable:,}") for x in parts]
    total, trained = sum(x.params for x in parts), sum(x.trainable for x in parts)
    rows.append(("total", "", f"{total:,}", f"{trained:,} ({100.0 * trained / max(total, 1):.2f}%)"))
    lines = [f"== parameters (stage '{s.name}': train_vision={s.train_vision}, train_connector="
             f"{s.train_connector}, train_llm={s.train_llm}; built on the meta device, no weights read) ==",
             *_table(rows, right=(2, 3))]
    mixed = cfg.train.precision == "bf16"
    lines += ["", f"== memory per GPU, world size {world_size}, precision {cfg.train.precision} ==",
              "params: " + ("2 B each" if mixed else "dtype size") + "; grads: same per trainable param; Adam: "
              + ("12 B per trainable param (fp32 master + 2 moments)" if mixed else "2 moments per trainable param")]
    unit, scale = _unit(max(m.total for m in mem))
    rows = [("ZeRO", f"params {unit}", f"grads {unit}", f"optimizer {unit}", f"total {unit}")]
    rows += [(f"{m.stage}{' *' if m.stage == cfg.train.zero_stage else ''}",
              *(f"{n / scale:,.2f}" for n in (m.params, m.grads, m.optimizer, m.total))) for m in mem]
    lines += _table(rows, right=(1, 2, 3, 4))
    lines.append("* = the configured train.zero_stage")
    lines.append("NOT included: activations (batch x length dependent), communication buckets, DeepSpeed buffers, "
                 "CUDA context")
    return "\n".join(lines)


def _unit(n: int) -> tuple[str, int]:
    """The largest binary unit in which ``n`` bytes is at least 1."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return unit, scale
    return "B", 1


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
