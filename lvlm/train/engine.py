"""The only module that touches DeepSpeed and torch.distributed.

Owns: process-group setup (NCCL on GPU, gloo on CPU; a single process needs no launcher),
the DeepSpeed JSON generated from the typed config, AdamW + warmup/decay schedule,
backward/step, the pre-clipping global gradient norm of each optimizer step, collective reductions, and
DeepSpeed checkpoint save/load.
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
from torch import nn

from lvlm.config.schema import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Start (or join) the process group; returns (rank, world_size, local_rank)."""
    import deepspeed

    if "RANK" in os.environ:  # started by a launcher: die (cleanly: SIGTERM -> checkpoint) with it
        from lvlm.train.preempt import die_with_launcher

        die_with_launcher()
    else:  # plain `python -m lvlm ...` / `lvlm train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from the typed config only (no "auto" values)."""
    t = cfg.train
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        ds["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def lr_lambda(cfg: Config):
    """Multiplier on optim.lr at scheduler step s: linear warmup, then cosine/linear/constant decay."""
    total, o = cfg.train.max_steps, cfg.optim
    warmup = int(round(o.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return f


# optimizer hyperparameters the config sets per param group: a checkpoint's values never override them
CONFIG_HPARAMS = ("initial_lr", "weight_decay", "betas", "eps")


def reapply_config_hparams(optimizer: torch.optim.Optimizer, scheduler, fresh: list[dict]) -> None:
    """After loading a checkpoint, put this config's hyperparameters back into the optimizer's groups.

    Loading restores the optimizer's param groups (lr, weight decay, betas, eps) and the scheduler's base
    rates as the checkpoint's run had them; the scheduler's lambda is this config's. With an unchanged
    config that is the same thing (the lr is recomputed bit for bit: base * lambda(step), as the scheduler
    does); under ``resume: force`` it is not: extending a finished cosine run trained its first new step
    at the old schedule's end value (0.0), and a changed optim.lr / weight_decay / betas / eps was ignored.
    ``fresh``: per group, CONFIG_HPARAMS as this config built them (same group order: same param_groups).
    """
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        raise RuntimeError(f"checkpoint has {len(groups)} optimizer param groups, this config builds {len(fresh)}")
    for group, want in zip(groups, fresh):
        group.update(want)
    scheduler.base_lrs = [want["initial_lr"] for want in fresh]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch keeps it in this attribute)


class Engine:
    """DeepSpeed engine plus the few collectives the loop needs."""

    def __init__(self, cfg: Config, model: nn.Module, run_dir: Path, rank: int, world_size: int) -> None:
        import deepspeed

        self.rank, self.world_size = rank, world_size
        self.ds_config = deepspeed_config(cfg, world_size)
        if rank == 0:
            (run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        from lvlm.train.stages import param_groups

        o = cfg.optim
        self.stage, self.llm_name = cfg.stage, cfg.model.llm.name_or_path
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps, fused=torch.cuda.is_available() or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self._fresh_hparams = [{k: g[k] for k in CONFIG_HPARAMS} for g in self.scheduler.optimizer.param_groups]
        self.device = device()
        # DeepSpeed's optimizer wrappers (ZeRO 1-3, bf16) keep the step's pre-clipping gradient norm; with the
        # plain optimizer (ZeRO 0, fp32) DeepSpeed clips without keeping it, so step() measures it itself
        self._measure_norm = not self.module.zero_optimization() and not hasattr(self.module.optimizer,
                                                                                  "_global_grad_norm")
        self._step_norm: torch.Tensor | None = None

    def forward(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def step(self) -> None:
        """Call after every micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        if self._measure_norm and self.module.is_gradient_accumulation_boundary():
            # the gradients are complete and all-reduced over ranks here, and not clipped yet
            self._step_norm = global_grad_norm(self.module.module)
        self.module.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def lrs(self) -> dict[str, float]:
        """Current learning rate per trained part (stage.lr)."""
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.scheduler.optimizer.param_groups)}

    def grad_norm(self) -> float | None:
        """Global L2 norm of the trainable parameters' gradients at the last optimizer step, before clipping
        (optim.grad_clip); None before the first step."""
        norm = self.module.get_global_grad_norm()
        if norm is None:
            norm = self._step_norm
        return None if norm is None else float(norm)

    def full_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """A trainable parameter's full gradient (gathered across ZeRO partitions), before step()."""
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, concatenated when they are lists."""
        import torch.distributed as dist

        if self.world_size == 1:
            return list(obj) if isinstance(obj, list) else [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        if all(isinstance(g, list) for g in gathered):
            return [x for g in gathered for x in g]
        return gathered

    def gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's rows [n_r, d] (n_r may differ) on rank 0, in rank order; None on other ranks."""
        import torch.distributed as dist

        if self.world_size == 1:
            return [rows]
        count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        wire = rows.float() if rows.dtype in (torch.bfloat16, torch.float16) else rows  # gloo: lossless upcast
        padded = wire.new_zeros((max(sizes), rows.shape[1]))
        padded[: rows.shape[0]] = wire
        if self.rank != 0:
            dist.gather(padded, dst=0)
            return None
        buffers = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.gather(padded, buffers, dst=0)
        return [b[:n].to(rows.dtype) for b, n in zip(buffers, sizes)]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict, carried: frozenset[str] = frozenset()) -> None:
        """DeepSpeed's full training state, plus ``trainable.safetensors``: every weight that is not the
        backbones' own (trained in this stage, or ``carried`` in from earlier ones), gathered, fp32, under the
        plain model's names, which is what the next stage, evaluation, MIR and export load without DeepSpeed.
        LoRA adapters are merged into their layers' weights, or (stage.lora.save: adapter) written apart in
        peft's format under ``lora_adapter/``."""
        from safetensors.torch import save_file

        from lvlm.train import lora

        self.module.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        merge = self.stage.lora.save == "merged"
        weights, adapters = stage_state_dict(self.module.module, zero3, carried, merge)
        if self.rank == 0:
            save_file(weights, str(ckpt_dir / tag / "trainable.safetensors"))
            if adapters and not merge:
                lora.save_adapter(ckpt_dir / tag, adapters, self.stage, len(self.module.module.llm.decoder_layers()),
                                  self.llm_name)

    def load(self, ckpt_dir: Path, tag: str) -> dict:
        path, client_state = self.module.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        reapply_config_hparams(self.scheduler.optimizer, self.scheduler, self._fresh_hparams)
        return client_state or {}


def global_grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm over every parameter's gradient (frozen ones have none), in one fused pass; leaves them as
    they are."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0, dtype=torch.float32)
                                                 for g in grads]), 2.0)


def _gathered(params: list[torch.Tensor], zero3: bool):
    if not zero3:
        from contextlib import nullcontext

        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def stage_state_dict(module: nn.Module, zero3: bool, carried: frozenset[str] = frozenset(),
                     merge_lora: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, adapters), full values on CPU in fp32 on every rank (ZeRO-3 partitions gathered one layer at a
    time). weights: trainable parameters and those named in ``carried``, under plain names, LoRA layers merged
    (``merge_lora``); adapters: the LoRA tensors in peft's naming (empty without LoRA)."""
    from lvlm.train import lora

    named = dict(module.named_parameters())
    wanted = [n for n, p in named.items()
              if ".lora_" not in n and (p.requires_grad or lora.plain_name(n) in carried)]
    with _gathered([named[n] for n in wanted], zero3):
        weights = {lora.plain_name(n): named[n].detach().float().cpu().clone() for n in wanted}
    adapters: dict[str, torch.Tensor] = {}
    for name, layer in lora.lora_layers(module).items():
        with _gathered(list(layer.parameters()), zero3):
            if merge_lora:
                weights[f"{name}.weight"] = lora.merged_weight(layer)
            adapters.update(lora.adapter_tensors(name, layer))
    return weights, adapters


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
