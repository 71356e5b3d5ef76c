"""End-to-end training through the real CLI: one process, 2-process DeepSpeed ZeRO-2 / ZeRO-3, and
kill-and-resume that reproduces the uninterrupted losses exactly, and the reference run against its golden
numbers (tests/assets/golden/)."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import golden
from runs import REPO, env, losses, run_train, train_cmd
from tiny_assets import assets_digest

from lvlm.track import read_metrics
from lvlm.train.checkpoint import COMPLETE

# Full fine-tuning of the tiny random LLM with a high lr: the loss must fall clearly within a few steps.
LEARN = ["--stage.train_llm", "true", "--optim.lr", "3e-3", "--optim.warmup_ratio", "0.1",
         "--train.micro_batch_size", "8"]


def mean(xs):
    return sum(xs) / len(xs)


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "step" in r}


def assert_falls(loss: dict[int, float], min_drop: float) -> None:
    steps = sorted(loss)
    head, tail = mean([loss[s] for s in steps[:3]]), mean([loss[s] for s in steps[-3:]])
    assert tail < (1 - min_drop) * head, f"loss did not fall by {min_drop:.0%}: {head:.4f} -> {tail:.4f}"


def test_single_process_end_to_end(tiny, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny, run, [*LEARN, "--train.max_steps", "16", "--train.save_every", "8",
                                 "--track.tensorboard", "true", "--train.progress", "true", "--train.log_every", "4"])
    assert "lvlm train summary" in proc.stdout
    # a log line every train.log_every steps, also beside the progress bar (it used to replace them)
    assert re.findall(r"lvlm\.train: step (\d+)/16 loss", proc.stderr) == ["4", "8", "12", "16"]
    loss = losses(run)
    assert sorted(loss) == list(range(1, 17))
    assert_falls(loss, 0.15)
    # the logged lr is the one each step's update used: warmup round(0.1 * 16) = 2 steps starts at half the
    # peak, and the last update's cosine lr is above 0 (0 would be the lr after the run)
    lr = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r}
    assert lr[1] == pytest.approx(1.5e-3) and lr[2] == lr[3] == pytest.approx(3e-3) and lr[4] < 3e-3
    assert 0 < lr[16] < lr[15]
    # every step logs its gradient norm (ZeRO 0, fp32: DeepSpeed keeps none; the engine measures it)
    norms = grad_norms(run)
    assert sorted(norms) == list(range(1, 17))
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms.values()), norms
    # the run directory records what is needed to reproduce the run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["vision"]["type"] == "hf" and cfg["stage"]["train_llm"] is True
    env_record = json.loads((run / "env.json").read_text())
    assert env_record["packages"]["torch"] and env_record["packages"]["deepspeed"] and "git_commit" in env_record
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["zero_optimization"]["stage"] == 0
    assert (run / "checkpoints" / "step_00000016" / COMPLETE).is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000016"
    # tensorboard got the same losses as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss.keys() == loss.keys() and all(abs(tb_loss[k] - loss[k]) < 1e-5 for k in loss)


def test_connector_only_stage_trains_only_the_connector(tiny, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny, run, ["--train.max_steps", "3", "--train.micro_batch_size", "4"])
    table = proc.stderr + proc.stdout
    assert "connector" in table and "trainable" in table
    # frozen parts unchanged in the checkpoint: only connector tensors differ from a fresh build
    assert sorted(losses(run)) == [1, 2, 3]


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """12 steps in one process, 8 samples per step in one micro-batch, MIR at steps 0, 6 and 12."""
    run = tmp_path_factory.mktemp("ref12") / "run"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "12"])
    return run


@pytest.fixture(scope="module")
def reference_12(reference_run):
    return losses(reference_run)


def assert_same_losses(got: dict, want: dict, rtol: float = 2e-4) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol), f"step {step}: {got[step]} vs {want[step]}"


def test_token_weighted_loss_is_invariant_to_gradient_accumulation(tiny, tmp_path, reference_12):
    """Same 8 samples per step as 2 x 4 with accumulation: identical losses only if each micro-batch is
    weighted by its share of the step's supervised tokens (a mean of per-batch means would differ)."""
    run = tmp_path / "accum"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "12", "--train.micro_batch_size", "4",
                          "--train.grad_accum", "2"])
    assert_same_losses(losses(run), reference_12)


def test_grad_norm_is_the_accumulated_norm_before_clipping(tiny, tmp_path, reference_run):
    """Step 1 sees the reference run's samples and weights: over 2 accumulated micro-batches with a clip far
    below the norm, the logged grad_norm is still the reference's (the full step's gradient, before clipping)."""
    run = tmp_path / "clipped"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "2", "--train.micro_batch_size", "4",
                          "--train.grad_accum", "2", "--optim.grad_clip", "1e-4"])
    got, want = grad_norms(run)[1], grad_norms(reference_run)[1]
    assert want > 1e-2 and got == pytest.approx(want, rel=1e-4)


def test_losses_lr_and_mir_match_the_golden_file(tiny, reference_run):
    """The reference run against the numbers stored in tests/assets/golden/ (torchtitan's practice):
    any change to what a run computes (data order, masking, schedule, init, model path, MIR) shows up
    here, also one that shifts every configuration alike and so passes the equivalence tests above.
    An intended change rewrites the file (LVLM_UPDATE_GOLDEN=1) and the diff goes into the commit."""
    got = golden.record(reference_run)
    digest = assets_digest(Path(tiny["model.llm.name_or_path"]).parent)
    if os.environ.get("LVLM_UPDATE_GOLDEN") == "1":
        golden.write(golden.TINY_TRAIN, got, digest)
        pytest.skip(f"rewrote {golden.TINY_TRAIN}")
    problems = golden.compare(golden.load(golden.TINY_TRAIN), got, digest)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_two_process_deepspeed(tiny, tmp_path, zero_stage, launcher, reference_run, reference_12):
    """2 ranks x 4 samples see the same 8 samples per step as the one-process reference, so with
    token-weighted loss across ranks the losses must match it (and fall)."""
    run = tmp_path / f"zero{zero_stage}"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "12", "--train.micro_batch_size", "4",
                          "--train.zero_stage", str(zero_stage), "--train.save_every", "6"],
              launcher=launcher, nproc=2)
    loss = losses(run)
    assert_falls(loss, 0.10)
    assert_same_losses(loss, reference_12)
    # DeepSpeed's ZeRO optimizer reports the pre-clipping norm: that of the same gradients in one process
    norms, want = grad_norms(run), grad_norms(reference_run)
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms.values()), norms
    assert norms[1] == pytest.approx(want[1], rel=1e-3)
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    ckpt = run / "checkpoints" / "step_00000012"
    assert (ckpt / "rng_rank0.json").is_file() and (ckpt / "rng_rank1.json").is_file()
    marker = json.loads((ckpt / COMPLETE).read_text())
    assert marker["step"] == 12 and marker["world_size"] == 2 and len(marker["id"]) == 32
    if zero_stage == 2:
        # resuming it with one process would repeat half of the data (raw sample i is rank i % world size's)
        # and halve the global batch: refused before any work
        cmd = train_cmd(tiny, run, [*LEARN, "--train.max_steps", "12", "--train.micro_batch_size", "4",
                                    "--train.zero_stage", "2", "--train.save_every", "6"])
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "world size (processes): 2 -> 1" in proc.stderr, proc.stderr[-3000:]


def _kill_after_checkpoint(cmd, run_dir, step: int, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    marker = run_dir / "checkpoints" / f"step_{step:08d}" / COMPLETE
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.05)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_and_resume_reproduces_losses_exactly(tiny, tmp_path):
    extra = [*LEARN, "--train.max_steps", "14", "--train.save_every", "4", "--data.num_workers", "2",
             "--train.keep_last", "5"]
    ref = tmp_path / "uninterrupted"
    run_train(tiny, ref, extra)
    # Kill as soon as step 8's checkpoint is complete; the process may have advanced further, and
    # resume must replay from the newest COMPLETE checkpoint whatever it is.
    run = tmp_path / "killed"
    _kill_after_checkpoint(train_cmd(tiny, run, extra), run, step=8)
    killed_steps = set(losses(run))
    assert 8 <= max(killed_steps) < 14, f"the kill came too late to test anything: {sorted(killed_steps)}"
    # a half-written checkpoint (no COMPLETE marker) newer than the last complete one is never resumed from
    from lvlm.train.checkpoint import latest_tag, tag_for

    last = int(latest_tag(run / "checkpoints").split("_")[1])
    partial = run / "checkpoints" / tag_for(last + 2)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = run_train(tiny, run, [*extra, "--resume", "true"])
    assert f"resumed from {tag_for(last)}" in proc.stderr + proc.stdout
    want, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, 15))
    for step in range(1, 15):
        assert got[step] == want[step], f"step {step}: resumed {got[step]!r} != uninterrupted {want[step]!r}"


def test_reusing_a_run_dir_never_mixes_two_configs(tiny, tmp_path):
    """Resuming under a changed training config is refused before any work (it would continue, or for a
    finished run silently keep, what another config trained); recording-only keys may change; `resume force`
    continues and records the differences; `resume false` moves the earlier run to superseded/ so its
    checkpoints and metrics do not mix with the new run's (they did: the old run's later checkpoint stayed
    the newest, and what `lvlm mir`/eval loaded)."""
    from lvlm.train.checkpoint import find_checkpoint

    run = tmp_path / "run"
    base = [*LEARN, "--train.max_steps", "4", "--train.save_every", "2"]
    run_train(tiny, run, base)
    assert (run / "checkpoints" / "step_00000004" / "config.yaml").is_file()
    before = (run / "config.yaml").read_text()

    proc = subprocess.run(train_cmd(tiny, run, [*base, "--optim.lr", "1e-4"]), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "optim.lr: 0.003 -> 0.0001" in proc.stderr and "--resume false" in proc.stderr
    assert "building model" not in proc.stderr  # refused before any work
    assert (run / "config.yaml").read_text() == before
    assert len(json.loads((run / "env.json").read_text())["starts"]) == 1

    proc = run_train(tiny, run, [*base, "--train.log_every", "1", "--mir.every", "0", "--data.num_workers", "0"])
    assert "resumed from step_00000004" in proc.stderr + proc.stdout

    run_train(tiny, run, [*base, "--optim.lr", "1e-4", "--resume", "force"])
    last = json.loads((run / "env.json").read_text())["starts"][-1]
    assert last["resumed_from"] == "step_00000004" and last["config_changes"] == ["optim.lr: 0.003 -> 0.0001"]

    # extending the finished run under force: from its first new step the new schedule's lr (it trained at
    # the old cosine's end value, 0.0) and the new optim.lr (the checkpoint's base rate was kept)
    longer = [*LEARN, "--train.max_steps", "6", "--train.save_every", "2", "--optim.lr", "2e-4"]
    run_train(tiny, run, [*longer, "--resume", "force"])
    from lvlm.config import load_config
    from lvlm.train.engine import lr_lambda
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r and r.get("step", 0) > 4}
    schedule = lr_lambda(load_config(None, longer))
    assert lrs == pytest.approx({5: 2e-4 * schedule(4), 6: 2e-4 * schedule(5)}, rel=1e-12) and lrs[5] > 0

    proc = run_train(tiny, run, [*LEARN, "--train.max_steps", "2", "--resume", "false"])
    (old,) = (run / "superseded").iterdir()
    assert (old / "checkpoints" / "step_00000004" / COMPLETE).is_file() and (old / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert find_checkpoint(run)[1].name == "step_00000002"
    assert sorted(losses(run)) == [1, 2]  # not the earlier run's steps 3-4
    assert len(json.loads((run / "env.json").read_text())["starts"]) == 1


def test_bf16_precision(tiny, tmp_path):
    run = tmp_path / "bf16"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "10", "--train.precision", "bf16"])
    assert json.loads((run / "ds_config.json").read_text())["bf16"] == {"enabled": True}
    assert_falls(losses(run), 0.05)


def test_mir_during_training_and_mir_command(tiny, tmp_path):
    from runs import mirs

    run = tmp_path / "mir"
    run_train(tiny, run, [*LEARN, "--train.max_steps", "8", "--mir.every", "4"])
    m = mirs(run)
    assert sorted(m) == [0, 4, 8] and all(v == v for v in m.values())  # before, every 4 steps, at the end
    assert len(set(m.values())) == 3  # training moves the hidden states
    assert (run / "loss_mir.png").is_file()
    # `lvlm mir` on the final checkpoint reproduces the in-training number for the same probe
    proc = subprocess.run([sys.executable, "-m", "lvlm", "mir", "--checkpoint", str(run)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "checkpoints" / "step_00000008" / "mir.json").read_text())
    assert report["mir"] == pytest.approx(m[8], rel=1e-6)
    assert len(report["per_layer"]) == 2 and len(report["probe_hash"]) == 64
    assert (run / "checkpoints" / "step_00000008" / "mir_layers.png").is_file()
    assert f"MIR = {report['mir']:.4f}" in proc.stdout
    # a probe the mir.* sources cannot fill is a clean error (it was a traceback)
    proc = subprocess.run([sys.executable, "-m", "lvlm", "mir", "--checkpoint", str(run), "--mir.num_samples",
                           "100000"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "lvlm mir: MIR probe (mir.*): MIR probe needs 100000" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_moca_under_zero3_trains_and_is_saved(tiny, tmp_path):
    """MoCa's per-layer calibrations are submodules the hooks call, so ZeRO-3 gathers them; they get
    gradients (the first-step check would stop the run otherwise), move, and land in the checkpoint."""
    from safetensors.torch import load_file

    from runs import mirs

    run = tmp_path / "moca"
    # 8 probe samples in batches of 3: rank 0 runs batches 0 and 2, rank 1 batch 1 (and a repeat);
    # one layer per pass, so the rows of every layer are gathered onto rank 0 separately
    run_train(tiny, run, ["--model.moca", "true", "--train.zero_stage", "3", "--train.max_steps", "4",
                          "--train.micro_batch_size", "4", "--mir.every", "2", "--optim.lr", "1e-2",
                          "--mir.batch_size", "3", "--mir.layers_per_pass", "1"],
              launcher="torchrun", nproc=2)
    weights = load_file(run / "checkpoints" / "step_00000004" / "trainable.safetensors")
    scales = [v for k, v in weights.items() if k.startswith("moca.layers.") and k.endswith(".scale")]
    assert len(scales) == 2 and any(not torch.allclose(s, torch.ones_like(s)) for s in scales)
    assert any(k.startswith("connector.") for k in weights) and not any(k.startswith("llm.") for k in weights)
    m = mirs(run)
    assert sorted(m) == [0, 2, 4]
    # the rank-split, gathered MIR equals one process running the whole probe on the saved weights
    proc = subprocess.run([sys.executable, "-m", "lvlm", "mir", "--checkpoint", str(run)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "checkpoints" / "step_00000004" / "mir.json").read_text())
    assert report["mir"] == pytest.approx(m[4], rel=1e-6)


@pytest.mark.slow
def test_mixed_caption_interleaved_text_stream_under_zero3(tiny, tmp_path):
    """A 45/45/10 caption / interleaved / text-only mixture, packed, on 2 ranks with ZeRO-3: batches of
    different modalities on different ranks must not hang, and the per-source counts follow the weights."""
    from pathlib import Path

    from lvlm.track import read_metrics

    world = Path(tiny["mir.images"]).parents[1]
    mix = {"captions": ("45", ["--data.mixture.captions.source.type", "webdataset",
                               "--data.mixture.captions.source.shards",
                               str(world / "captions" / "train-{000000..000003}.tar")]),
           "stories": ("45", ["--data.mixture.stories.source.type", "interleaved",
                              "--data.mixture.stories.source.files",
                              str(world / "stories" / "train-{000000..000003}.tar")]),
           "text": ("10", ["--data.mixture.text.source.type", "text", "--data.mixture.text.source.format",
                           "webdataset", "--data.mixture.text.source.files",
                           str(world / "text" / "train-{000000..000001}.tar")])}
    args = [x for name, (w, rest) in mix.items() for x in (f"--data.mixture.{name}.weight", w, *rest)]
    run = tmp_path / "mixed"
    run_train(tiny, run, [*args, "--data.pack", "true", "--data.max_length", "96", "--train.zero_stage", "3",
                          "--train.max_steps", "5", "--train.micro_batch_size", "4", "--mir.every", "0",
                          "--stage.train_llm", "true"],
              launcher="torchrun", nproc=2)
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 5 and all(r["loss"] == r["loss"] and 0 <= r["padding_waste"] < 1 for r in steps)
    summary = next(r for r in records if r.get("kind") == "summary")
    samples = {k: v["samples"] for k, v in summary["sources"].items()}
    total = sum(samples.values())                    # packed: 4 rows of 96 per micro-batch, > 4 samples each
    assert total > 40 and set(samples) == {"captions", "stories", "text"}
    for name, share in (("captions", 0.45), ("stories", 0.45), ("text", 0.10)):
        assert abs(samples[name] - share * total) <= 3, samples       # each rank reads a prefix of its split
    assert all(v["tokens"] > 0 for v in summary["sources"].values())


@pytest.mark.slow
def test_text_only_rank_next_to_image_rank_does_not_hang_zero3(tiny, tmp_path):
    """Equal weights alternate caption, text, caption, ... and sample i goes to rank i % 2, so with one
    sample per micro-batch rank 0 only ever sees images and rank 1 only text: ZeRO-3 must not hang."""
    from pathlib import Path

    from lvlm.track import read_metrics

    world = Path(tiny["mir.images"]).parents[1]
    run = tmp_path / "split"
    run_train(tiny, run, ["--data.mixture.cap.weight", "1", "--data.mixture.cap.source.type", "webdataset",
                          "--data.mixture.cap.source.shards", str(world / "captions" / "train-{000000..000003}.tar"),
                          "--data.mixture.txt.weight", "1", "--data.mixture.txt.source.type", "text",
                          "--data.mixture.txt.source.format", "webdataset", "--data.mixture.txt.source.files",
                          str(world / "text" / "train-{000000..000001}.tar"),
                          "--train.zero_stage", "3", "--train.max_steps", "3", "--train.micro_batch_size", "1",
                          "--mir.every", "0"],
              launcher="torchrun", nproc=2, timeout=300)
    summary = next(r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "summary")
    assert {k: v["samples"] for k, v in summary["sources"].items()} == {"cap": 3, "txt": 3}


def test_a_first_step_without_images_defers_the_gradient_check(tiny, tmp_path):
    """The first-step check that every trained part got a gradient waits for a step with an image: a mixture
    whose first micro-batch is text-only trained fine in two processes but failed in one ("stage trains
    'connector' but it received no gradient"), and a shard of undecodable images failed with that message
    instead of TooManySkipsError with the skip counts."""
    import tarfile
    from io import BytesIO
    from pathlib import Path

    from lvlm.track import read_metrics

    world = Path(tiny["mir.images"]).parents[1]
    run = tmp_path / "text_first"
    run_train(tiny, run, ["--data.mixture.txt.weight", "1", "--data.mixture.txt.source.type", "text",
                          "--data.mixture.txt.source.format", "webdataset", "--data.mixture.txt.source.files",
                          str(world / "text" / "train-{000000..000001}.tar"),
                          "--data.mixture.cap.weight", "1", "--data.mixture.cap.source.type", "webdataset",
                          "--data.mixture.cap.source.shards", str(world / "captions" / "train-{000000..000003}.tar"),
                          "--train.max_steps", "3", "--train.micro_batch_size", "1", "--mir.every", "0"])
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [s for s in steps[0]["sources"]] and steps[0]["sources"]["cap"]["samples"] == 0  # step 1: text only

    bad = tmp_path / "corrupt-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for i in range(300):
            for ext, data in (("jpg", b"not a jpeg" * 8), ("txt", b"a red circle at the top")):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
    proc = subprocess.run(train_cmd(tiny, tmp_path / "corrupt", ["--data.source.shards", str(bad),
                                                                 "--train.max_steps", "30", "--mir.every", "0",
                                                                 "--data.num_workers", "0"]),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "TooManySkipsError" in proc.stderr and "'corrupt_image'" in proc.stderr, proc.stderr[-2000:]
    assert "received no gradient" not in proc.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_resumes(tiny, tmp_path):
    """SIGTERM mid-run: the step in progress finishes, a checkpoint is saved, the process exits 0; the very
    same command (resume: auto) continues from it and ends with the uninterrupted run's losses."""
    extra = [*LEARN, "--train.max_steps", "12", "--train.save_every", "0", "--data.num_workers", "2"]
    ref = tmp_path / "ref"
    run_train(tiny, ref, extra)
    run = tmp_path / "preempted"
    cmd = train_cmd(tiny, run, extra)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        assert proc.poll() is None and time.time() < deadline, "run ended or hung before step 3"
        time.sleep(0.05)
    import os

    os.killpg(proc.pid, signal.SIGTERM)          # the whole group, data-loader workers included, as schedulers do
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal (SIGTERM)" in out and "relaunch the same command" in out
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*") if (p / COMPLETE).is_file())
    assert len(saved) == 1 and 3 <= int(saved[0][5:]) < 12
    assert f"steps         : {int(saved[0][5:])} of 12" in out       # the summary says where it stopped
    resumed = run_train(tiny, run, extra)        # the same command, no --resume flag
    assert f"resumed from {saved[0]}" in resumed.stdout + resumed.stderr
    assert losses(run) == losses(ref)            # bit for bit, as the kill-and-resume test


# Runs `lvlm train` with Engine.backward sending SIGTERM to its own process during step argv[1]'s backward pass.
SIGNAL_IN_STEP = """
import os, runpy, signal, sys
from lvlm.train.engine import Engine
at, calls, backward = int(sys.argv.pop(1)), [0], Engine.backward
def signalling_backward(self, loss):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return backward(self, loss)
Engine.backward = signalling_backward
sys.argv[0] = "lvlm"
runpy.run_module("lvlm", run_name="__main__")
"""


def test_a_signal_during_a_step_stops_after_that_step(tiny, tmp_path):
    """SIGTERM during step 3's backward pass: step 3 finishes, its checkpoint is the one saved and no step 4
    runs (the flag is read in the all-reduce after the update; read at the next step's start, a 4th step ran)."""
    run = tmp_path / "run"
    cmd = train_cmd(tiny, run, [*LEARN, "--train.max_steps", "8", "--train.save_every", "0",
                                "--data.num_workers", "0"])
    assert cmd[1:3] == ["-m", "lvlm"]
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_STEP, "3", *cmd[3:]], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal (SIGTERM): checkpoint at step 3 saved" in out, out[-3000:]
    assert sorted(losses(run)) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]


@pytest.mark.slow
def test_ranks_of_a_killed_launcher_checkpoint_and_exit_and_a_busy_run_dir_is_refused(tiny, tmp_path):
    """SIGKILL to torchrun's process group (its workers run in their own sessions, so it never reaches them):
    the ranks get SIGTERM from the kernel as their launcher dies, save a checkpoint and exit, instead of
    training on, orphaned, beside a relaunch of the same command. A launch into a run dir whose lock is held
    is refused before any work."""
    import os

    from lvlm.train.runlock import RunLock

    run = tmp_path / "killed"
    extra = [*LEARN, "--train.max_steps", "400", "--train.save_every", "0", "--train.micro_batch_size", "4"]
    proc = subprocess.Popen(train_cmd(tiny, run, extra, launcher="torchrun", nproc=2), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        assert proc.poll() is None and time.time() < deadline, "run ended or hung before step 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)                              # EOF: every rank has exited
    assert "preemption signal (SIGTERM)" in out, out[-3000:]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*") if (p / COMPLETE).is_file())
    assert len(saved) == 1 and 3 <= int(saved[0][5:]) < 400
    summary = [r for r in read_metrics(metrics) if r.get("kind") == "summary"]
    assert len(summary) == 1 and summary[0]["preempted"] is True

    held = RunLock(run)
    held.acquire()
    try:
        busy = subprocess.run(train_cmd(tiny, run, extra, launcher="torchrun", nproc=2), cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    assert busy.returncode != 0 and "is in use by another training run" in busy.stderr, busy.stderr[-2000:]
    assert "building model" not in busy.stderr and len(list((run / "checkpoints").glob("step_*"))) == 1
