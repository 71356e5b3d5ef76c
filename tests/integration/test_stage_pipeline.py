"""Multi-stage pipelines end to end: align -> partial-LLM pre-training -> LoRA SFT, each stage from the
previous stage's weights, under 2-process DeepSpeed ZeRO-3; carried weights, the adapter in peft's format,
per-part learning rates, MIR of the final stage, and a relaunch that skips finished stages."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from runs import REPO, env
from tiny_assets import as_args

from lvlm.track import read_metrics

PIPE = """
train: {{max_steps: 3, micro_batch_size: 4, save_every: 0, progress: false}}
optim: {{lr: 3.0e-3, warmup_ratio: 0.0, schedule: constant}}
mir: {{every: 0}}
stages:
  align: {{}}
  pretrain:
    stage: {{train_connector: false, train_llm: true, llm_up_to_layer: 1}}
  sft:
    stage: {{train_llm: true, lora: {{r: 4, alpha: 8, dropout: 0.0, save: {save}}}, lr: {{llm: 1.0e-2}}}}
"""


def final(run, stage):
    return run / stage / "checkpoints" / "step_00000003"


def launch(tiny, pipe, run, nproc):
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    extra = ["--train.zero_stage", "3"] if nproc > 1 else []
    tiny = {k: v for k, v in tiny.items() if not k.startswith("mir.every")}
    cmd = [*prefix, "-m", "lvlm", "train", str(pipe), *as_args(tiny), "--run_dir", str(run), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("nproc, save", [(2, "adapter"), (1, "merged")])
def test_three_stage_pipeline_carries_weights(tiny, tmp_path, nproc, save):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(textwrap.dedent(PIPE.format(save=save)))
    run = tmp_path / "run"
    launch(tiny, pipe, run, nproc)
    align, pre, sft = (load_file(str(final(run, s) / "trainable.safetensors")) for s in ("align", "pretrain", "sft"))
    base = load_file(str(next((REPO / tiny["model.llm.name_or_path"]).glob("*.safetensors"))))
    assert set(align) == {k for k in align if k.startswith("connector.")} and align
    layer0 = {k for k in pre if k.startswith("llm.")}
    assert layer0 and all(".layers.0." in k for k in layer0)
    for k in layer0:  # pre-training changed layer 0 ...
        assert not torch.equal(pre[k], base[k[len("llm.model."):]].float()), k
    for k in align:  # ... and carried the aligned connector it did not train
        assert torch.equal(pre[k], align[k]), k
    for k in layer0:  # SFT carried layer 0 on
        if save == "adapter" or "proj" not in k:
            assert torch.equal(sft[k], pre[k]), k
    assert any(not torch.equal(sft[k], pre[k]) for k in align), "SFT trained the connector"
    assert not any(".lora_" in k or "base_layer" in k for k in sft)
    adapter = final(run, "sft") / "lora_adapter"
    if save == "adapter":
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert not any("q_proj" in k and ".layers.1." in k for k in sft)
    else:
        assert not adapter.exists()
        merged = [k for k in sft if ".layers.1." in k and k.endswith("q_proj.weight")]
        assert merged and not torch.equal(sft[merged[0]], base[merged[0][len("llm.model."):]].float())
    lrs = [r["lrs"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "lrs" in r]
    assert lrs and lrs[0]["llm"] == pytest.approx(1e-2) and lrs[0]["connector"] == pytest.approx(3e-3)
    status = (run / "pipeline.json").read_text()
    assert status.count('"done": true') == 3
    # MIR of the final stage (adapters folded in when kept apart)
    mir = subprocess.run([sys.executable, "-m", "lvlm", "mir", "--checkpoint", str(run / "sft")], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert mir.returncode == 0 and "MIR" in mir.stdout, mir.stderr[-3000:]
    if nproc == 1:  # relaunching the same command skips every finished stage
        stamp = (final(run, "sft") / "trainable.safetensors").stat().st_mtime_ns
        again = launch(tiny, pipe, run, 1)
        assert (again.stdout + again.stderr).count("done already") == 3
        assert (final(run, "sft") / "trainable.safetensors").stat().st_mtime_ns == stamp
