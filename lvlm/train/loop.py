"""The training loop: reads top to bottom, one log line per phase.

Loss is token-weighted: each micro-batch contributes (sum of its token losses) / (supervised
tokens in the whole optimizer step, over every accumulation step and rank), so the gradient
is that of the mean over all supervised tokens of the step, not a mean of per-batch means.
"""
from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from lvlm.config import ConfigError
from lvlm.config.schema import Config
from lvlm.data.build import build_sources, build_train_loader, check_max_length, stop_workers
from lvlm.data.skips import merge_skip_counts
from lvlm.models.build import build_lvlm
from lvlm.models.lvlm import IGNORE_INDEX
from lvlm.track import Tracker
from lvlm.train import checkpoint, engine as eng, lora, stages
from lvlm.train.preempt import PreemptionFlag
from lvlm.train.rundir import check_resume, supersede, write_run_record
from lvlm.train.runlock import RunLock

log = logging.getLogger("lvlm.train")
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids", "sequence_ids")


@dataclass
class Summary:
    run_dir: str
    steps: int
    last_step: int = 0  # the last step trained (steps, unless preempted)
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: str | None = None
    preempted: bool = False
    skipped: dict = field(default_factory=dict)
    mir: list[tuple[int, float]] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # mixture source -> {"samples": n, "tokens": n}, all ranks

    def head_tail(self, k: int = 5) -> tuple[float, float] | None:
        """Mean loss of the first and of the last k steps (single steps are noisy)."""
        if not self.losses:
            return None
        k = max(1, min(k, len(self.losses) // 2 or 1))
        return float(np.mean(self.losses[:k])), float(np.mean(self.losses[-k:]))

    @property
    def loss_drop(self) -> float | None:
        ends = self.head_tail()
        if ends is None or ends[0] == 0:
            return None
        return 1.0 - ends[1] / ends[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_KEYS if batch.get(k) is not None}


def train(cfg: Config) -> Summary:
    rank, world, _ = eng.init_distributed()
    lock = RunLock(Path(cfg.run_dir), enabled=rank == 0)  # one process group per run directory
    try:
        return _train(cfg, rank, world, lock)
    finally:
        lock.release()


def _train(cfg: Config, rank: int, world: int, lock: RunLock) -> Summary:
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    seed_everything(cfg.seed)
    changes = _check_run_dir(cfg, run_dir, world)
    lock.check()  # a run dir another live run holds: refused before any work (writes nothing)

    log.info("building model: vision=%s connector=%s llm=%s", type(cfg.model.vision).__name__,
             type(cfg.model.connector).__name__, cfg.model.llm.name_or_path)
    try:
        model, image_transform, tokenizer = build_lvlm(cfg.model)
    except ValueError as e:  # a value only the backbones can judge (feature_layer past the tower, image_token...)
        raise ConfigError(str(e)) from e
    loaded, started_from = _init_from(model, cfg.stage.init_from)  # started_from: recorded in every checkpoint
    carried = frozenset(loaded)
    try:
        lora.add_lora(model, cfg.stage)
        plan = stages.apply_stage(model, cfg.stage)
    except ValueError as e:  # a stage this model cannot have (e.g. stage.vision_from_layer past its blocks)
        raise ConfigError(str(e)) from e
    log.info("stage '%s': trainable parameters\n%s", cfg.stage.name, stages.parameter_table(model))
    sources, probe = _data_and_probe(cfg, model, image_transform)
    _supersede_if_fresh(cfg, run_dir, rank, world)  # only now: a refused model, stage or data moves nothing
    if cfg.train.activation_checkpointing:
        model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()  # held from here until train() returns
    engine = eng.Engine(cfg, model, run_dir, rank, world)
    stages.set_train_modes(engine.module.module, plan)

    start_step, resumed_from = 0, None
    if str(cfg.resume).lower() != "false":
        state = checkpoint.load(engine, run_dir)
        if state is not None:
            start_step, resumed_from = int(state["step"]), state["tag"]
            log.info("resumed from %s at step %d", resumed_from, start_step)
        elif str(cfg.resume).lower() == "true":
            log.info("resume requested but no complete checkpoint in %s: starting fresh", run_dir / "checkpoints")
    if rank == 0:
        write_run_record(run_dir, cfg, world, resumed_from, changes if resumed_from else None)

    accum = cfg.train.grad_accum
    loader = build_train_loader(
        cfg.data, tokenizer=tokenizer, image_transform=image_transform, image_size=model.vision.image_size,
        image_token_id=model.image_token_id, tokens_per_image=model.tokens_per_image,
        bos_token_id=model.llm.bos_token_id, eos_token_id=model.llm.eos_token_id,
        pad_token_id=model.llm.pad_token_id, micro_batch_size=cfg.train.micro_batch_size,
        rank=rank, world_size=world, seed=cfg.seed, start_batch=start_step * accum, sources=sources)
    batches = iter(loader)
    what = f"mixture of {', '.join(name for name, _, _ in sources)}" if cfg.data.mixture else sources[0][0]
    log.info("data: %s, %d image tokens per image, %d rank(s) x %d x %d samples per step", what,
             model.tokens_per_image, world, accum, cfg.train.micro_batch_size)

    from lvlm.config import dump_config

    config_yaml = dump_config(cfg)
    metrics = Tracker(run_dir, cfg.track, config=yaml.safe_load(config_yaml), enabled=rank == 0)
    summary = Summary(run_dir=str(run_dir), steps=cfg.train.max_steps, resumed_from=resumed_from)

    def measure_mir(at_step: int) -> None:
        from lvlm.mir.collect import probe_mir

        engine.module.eval()
        result = probe_mir(engine.forward, probe, model.llm.num_layers, engine.device, cross=cfg.mir.cross,
                           layers_per_pass=cfg.mir.layers_per_pass, memory_gb=cfg.mir.memory_gb,
                           rank=rank, world_size=world, gather=engine.gather_rows)
        stages.set_train_modes(engine.module.module, plan)
        if result is not None:
            metrics.write({"kind": "mir", "step": at_step, "mir": result.mir, "per_layer": result.per_layer,
                           "cross": result.cross, "probe_hash": probe.digest})
            log.info("step %d MIR %.4f", at_step, result.mir)
            summary.mir.append((at_step, result.mir))

    if probe is not None and start_step == 0:
        measure_mir(0)
    mix_names = list(cfg.data.mixture)
    bar = _progress(cfg, start_step) if rank == 0 else None
    t_start = time.perf_counter()
    per_worker: dict[int, dict] = {}  # cumulative skip counts of each of this rank's data workers
    workers = max(1, cfg.data.num_workers)
    preempt = PreemptionFlag()
    grad_check_pending = True
    image_parts = any(plan.get(part) for part in ("vision", "connector", "moca"))  # trained parts images feed
    with preempt, ExitStack() as cleanup:
        # end the data workers when training ends, also on an error (see stop_workers)
        cleanup.callback(stop_workers, batches)
        if bar is not None:  # log lines (train.log_every, MIR, checkpoints) print above the bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            cleanup.enter_context(logging_redirect_tqdm())
        for step in range(start_step, cfg.train.max_steps):
            t0 = time.perf_counter()
            lr, lrs = engine.lr, engine.lrs  # the rates this step's update uses (the scheduler steps with it)
            micro = [next(batches) for _ in range(accum)]
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            local_images = sum(b["pixel_values"].shape[0] for b in micro)
            (global_tokens, images) = engine.all_reduce_sum([local_tokens, float(local_images)])
            # the first-step gradient check waits for a step with an image (on any rank): without one the parts
            # before the LLM get no gradient (a text-only first batch of a mixture, every image skipped so far)
            check_now = grad_check_pending and (images > 0 or not image_parts)
            scale = world * accum / max(global_tokens, 1.0)
            loss_parts = []  # per micro-batch, on the device: one host sync per step, not per micro-batch
            mix_counts = [0.0] * (2 * len(mix_names) + 2)  # per source: samples, tokens; then padded, positions
            for batch in micro:
                for j, name in enumerate(mix_names):
                    samples, tokens = batch["source_counts"].get(name, (0, 0))
                    mix_counts[2 * j] += samples
                    mix_counts[2 * j + 1] += tokens
                positions = batch["input_ids"].numel()
                mix_counts[-2] += positions - sum(batch["lengths"])
                mix_counts[-1] += positions
            for i, batch in enumerate(micro):
                out = engine.forward(**_to_device(batch, engine.device))
                engine.backward(out.loss_sum * scale)
                if check_now and i == accum - 1:
                    stages.check_gradients(engine.module.module, plan, engine.full_grad)
                    grad_check_pending = False
                engine.step()
                loss_parts.append(out.loss_sum.detach().double())
                per_worker[batch["batch_index"] % workers] = batch["skipped"]
            loss_sum = float(torch.stack(loss_parts).sum())
            # the preemption flag rides on the all-reduce every step makes after its update: a signal that
            # arrives during this step's compute stops the run after this step, on every rank alike
            (loss_total, stop, *mix_counts) = engine.all_reduce_sum([loss_sum, float(preempt.requested),
                                                                     *mix_counts])
            step_sources = {name: {"samples": int(mix_counts[2 * j]), "tokens": int(mix_counts[2 * j + 1])}
                            for j, name in enumerate(mix_names)}
            for name, c in step_sources.items():
                total = summary.sources.setdefault(name, {"samples": 0, "tokens": 0})
                total["samples"] += c["samples"]
                total["tokens"] += c["tokens"]
            loss = loss_total / max(global_tokens, 1.0)
            dt = time.perf_counter() - t0
            summary.tokens += int(global_tokens)
            summary.losses.append(loss)
            if summary.first_loss is None:
                summary.first_loss = loss
            summary.last_loss = loss
            summary.last_step = step + 1
            skipped = merge_skip_counts(list(per_worker.values()))
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": engine.grad_norm(),
                      "tokens": int(global_tokens), "tokens_per_s": global_tokens / dt, "step_time_s": dt,
                      "skipped": skipped, "padding_waste": mix_counts[-2] / max(mix_counts[-1], 1.0)}
            if len(set(lrs.values())) > 1:
                record["lrs"] = lrs
            if len(mix_names) > 1:
                record["sources"] = step_sources
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{global_tokens / dt:,.0f}", refresh=False)
                bar.update(1)
            if (step + 1) % cfg.train.log_every == 0 and rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step + 1, cfg.train.max_steps, loss, lr,
                         global_tokens / dt)
            done = step + 1 == cfg.train.max_steps
            if probe is not None and (done or (step + 1) % cfg.mir.every == 0):
                measure_mir(step + 1)
            if stop > 0 and not done:
                stop_workers(batches)  # stop the data workers first: from here their exit is no longer an error
            if done or stop > 0 or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
                client_state = {"step": step + 1, "batches_consumed": (step + 1) * accum, "seed": cfg.seed}
                path = checkpoint.save(engine, run_dir, step + 1, client_state, cfg.train.keep_last, carried,
                                       config_yaml=config_yaml, started_from=started_from)
                log.info("checkpoint %s", path)
            if stop > 0 and not done:
                summary.preempted = True
                log.info("preemption signal (%s): checkpoint at step %d saved; exiting. Relaunch the same command "
                         "to resume.", preempt.signal_name or "on another rank", step + 1)
                break
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - t_start
    skipped = merge_skip_counts(engine.all_gather_object(list(per_worker.values())))
    summary.skipped = skipped
    if rank == 0 and skipped:
        log.info("skipped samples (all ranks): %s", ", ".join(f"{k}={v}" for k, v in skipped.items()))
    metrics.write({"kind": "summary", "first_loss": summary.first_loss, "last_loss": summary.last_loss,
                   "loss_drop": summary.loss_drop, "tokens": summary.tokens, "seconds": summary.seconds,
                   "skipped": skipped, "resumed_from": resumed_from, "sources": summary.sources,
                   "preempted": summary.preempted})
    if rank == 0 and summary.sources:
        log.info("samples / tokens per source (this run): %s", ", ".join(
            f"{k}={v['samples']}/{v['tokens']}" for k, v in summary.sources.items()))
    metrics.close()
    if rank == 0 and probe is not None:
        from lvlm.mir.report import plot_run
        from lvlm.track import read_metrics

        plot_run(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_mir.png")
    return summary


def _check_run_dir(cfg: Config, run_dir: Path, world: int) -> list[str]:
    """Before any work: refuse to resume under a changed config, start point or process count
    (``rundir.check_resume``). Returns the changes a ``resume: force`` continues under ([] otherwise)."""
    if str(cfg.resume).lower() == "false":
        return []
    _, changes = check_resume(run_dir, cfg, world)
    if changes:
        log.warning("resume force: continuing %s under a changed config (checkpoint -> now):\n  %s", run_dir,
                    "\n  ".join(changes))
    return changes


def _data_and_probe(cfg: Config, model, image_transform):
    """The data sources and the MIR probe (None with ``mir.every`` 0), built before anything is written: a
    missing file, a ``data.max_length`` below one image or an unusable probe is a ConfigError here, not a
    traceback after the run directory was written (or an earlier run moved away)."""
    try:
        check_max_length(cfg.data, model.tokens_per_image, model.llm.bos_token_id)
        sources = build_sources(cfg.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e
    if not cfg.mir.every:
        return sources, None
    from lvlm.mir.api import probe_for

    probe = probe_for(cfg, model, image_transform)  # ConfigError when mir.* cannot give it
    log.info("MIR probe: %d samples (hash %s), every %d steps%s", probe.num_samples, probe.digest[:12],
             cfg.mir.every, f"; passed over: {probe.skipped}" if probe.skipped else "")
    return sources, probe


def _supersede_if_fresh(cfg: Config, run_dir: Path, rank: int, world: int) -> None:
    """A fresh start (``resume: false``) moves an earlier run in ``run_dir`` out of the way; called once the
    model and its stage plan are built, so a run refused there leaves the earlier one where it was."""
    if str(cfg.resume).lower() != "false":
        return
    if rank == 0:
        moved = supersede(run_dir)
        if moved is not None:
            log.info("resume false: the earlier run in %s moved to %s", run_dir, moved)
    if world > 1:
        torch.distributed.barrier()  # no rank writes into run_dir before the move


def _init_from(model, init_from: str) -> tuple[list[str], dict | None]:
    """Load a previous stage's weights (and fold in its LoRA adapters); returns the names loaded and the
    checkpoint's ``identity`` (a pipeline tells a stale stage by it), or ([], None) without ``init_from``."""
    if not init_from:
        return [], None
    _, ckpt = checkpoint.find_checkpoint(init_from)
    names = checkpoint.load_stage_weights(model, ckpt)
    log.info("stage starts from %s: %d weight tensors loaded", ckpt, len(names))
    return names, checkpoint.identity(ckpt)


def _progress(cfg: Config, start_step: int):
    if not cfg.train.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start_step, desc=f"stage {cfg.stage.name}", unit="step",
                dynamic_ncols=True)
