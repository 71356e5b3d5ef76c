"""`lvlm info`: environment report; weightless parameter counts equal a real build's; ZeRO memory formula."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from model_fixtures import save_llm
from vision_fixtures import save_hf

from lvlm.cli.info import main as info_main
from lvlm.config import load_config
from lvlm.info import PartSize, model_sizes, zero_memory
from lvlm.models.build import build_lvlm
from lvlm.train.stages import apply_stage, stage_modules


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny HF CLIP + tiny Llama checkpoints, and copies of them with the weight files deleted."""
    root = tmp_path_factory.mktemp("info")
    save_hf("clip", root / "clip")
    save_llm("llama", root / "llama")
    for name in ("clip", "llama"):
        shutil.copytree(root / name, root / f"{name}-noweights")
        for f in (root / f"{name}-noweights").glob("*.safetensors"):
            f.unlink()
    return {"root": root, "clip": root / "clip", "llama": root / "llama",
            "clip_nw": root / "clip-noweights", "llama_nw": root / "llama-noweights"}


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def write_config(path: Path, vision: Path, llm: Path, **sections: dict) -> Path:
    cfg = {"model": {"vision": {"type": "hf", "name_or_path": str(vision)}, "llm": {"name_or_path": str(llm)}}}
    _merge(cfg, sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_environment_report() -> None:
    proc = subprocess.run([sys.executable, "-m", "lvlm.cli.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("== versions ==")  # DeepSpeed's import chatter kept off stdout
    import deepspeed
    import torch
    import transformers

    for line in (f"torch              : {torch.__version__}", f"transformers       : {transformers.__version__}",
                 f"deepspeed          : {deepspeed.__version__}", "python", "open_clip", "flash_attn",
                 "cuda available"):
        assert line in out
    assert "== devices ==" in out and f"{torch.cuda.device_count()} CUDA device(s)" in out
    assert "== DeepSpeed ops" in out and "FusedAdamBuilder" in out and "CPUAdamBuilder" in out


@pytest.mark.parametrize("stage, moca", [
    ({"train_vision": False, "train_connector": True, "train_llm": False}, False),
    ({"train_vision": False, "train_connector": True, "train_llm": True}, True),
    ({"train_vision": True, "train_connector": False, "train_llm": True}, True),
])
def test_counts_equal_a_real_build(tiny, tmp_path: Path, stage: dict, moca: bool) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny["clip"], tiny["llama"], stage=stage,
                                   model={"moca": moca}))
    model, _, _ = build_lvlm(cfg.model)
    apply_stage(model, cfg.stage)
    real = {name: (sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
            for name, m in stage_modules(model).items()}
    # the weightless build needs only configs and tokenizers: the weight files are gone
    nw = load_config(write_config(tmp_path / "nw.yaml", tiny["clip_nw"], tiny["llama_nw"], stage=stage,
                                  model={"moca": moca}))
    sizes = {p.name: (p.params, p.trainable) for p in model_sizes(nw)}
    assert sizes == real
    assert ("moca" in sizes) == moca
    trains = {"vision": stage["train_vision"], "connector": stage["train_connector"], "llm": stage["train_llm"],
              "moca": stage["train_connector"]}  # MoCa trains with the connector
    for name, (total, trainable) in sizes.items():
        assert total > 0 and trainable == (total if trains[name] else 0)


def test_lora_stage_counts_equal_the_trained_model(tiny, tmp_path: Path) -> None:
    """A LoRA stage: info builds the model as train() does (adapters injected, then the stage applied), so its
    counts and memory estimate cover the adapters that train, not a frozen LLM."""
    from lvlm.train.lora import add_lora
    from lvlm.train.stages import parameter_table

    stage = {"train_llm": True, "llm_up_to_layer": 1, "lora": {"r": 4}}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny["clip"], tiny["llama"], stage=stage))
    model, _, _ = build_lvlm(cfg.model)
    add_lora(model, cfg.stage)  # what lvlm.train.loop.train does before apply_stage
    apply_stage(model, cfg.stage)
    real = {name: (sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
            for name, m in stage_modules(model).items()}
    adapters = sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" in n)
    assert adapters > 0 and real["llm"][1] == adapters
    nw = load_config(write_config(tmp_path / "nw.yaml", tiny["clip_nw"], tiny["llama_nw"], stage=stage))
    parts = model_sizes(nw)
    sizes = {p.name: (p.params, p.trainable) for p in parts}
    assert sizes == real
    llm_row = next(line for line in parameter_table(model).splitlines() if line.startswith("llm "))
    assert llm_row.split()[1:3] == [f"{real['llm'][0]:,}", f"{adapters:,}"]  # train's logged table agrees
    by = {p.name: p for p in parts}
    assert by["llm"].grad_bytes == 4 * adapters and by["llm"].optim_bytes == 2 * 4 * adapters  # fp32: grads + Adam


def test_parameter_bytes_follow_precision(tiny, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny["clip_nw"], tiny["llama_nw"], stage={"train_llm": True},
                        model={"llm": {"dtype": "bfloat16"}})
    fp32 = model_sizes(load_config(path))  # built dtypes: vision fp32, LLM + connector bf16
    by = {p.name: p for p in fp32}
    assert by["vision"].param_bytes == 4 * by["vision"].params
    assert by["llm"].param_bytes == 2 * by["llm"].params and by["connector"].param_bytes == 2 * by["connector"].params
    assert by["llm"].optim_bytes == 2 * 2 * by["llm"].trainable and by["vision"].optim_bytes == 0
    for p in model_sizes(load_config(path, ["--train.precision", "bf16"])):  # mixed precision: 2 + 2 + 12
        assert (p.param_bytes, p.grad_bytes, p.optim_bytes) == (2 * p.params, 2 * p.trainable, 12 * p.trainable)


def test_zero_memory_formula() -> None:
    parts = [PartSize("vision", "V", 1000, 0, 2000, 0, 0), PartSize("connector", "C", 101, 101, 202, 202, 1212),
             PartSize("llm", "L", 5000, 5000, 10000, 10000, 60000)]
    p, g, o = 12202, 10202, 61212
    mem = zero_memory(parts, 4)
    assert [(m.stage, m.params, m.grads, m.optimizer) for m in mem] == [
        (0, p, g, o), (1, p, g, 15303), (2, p, 2551, 15303), (3, 3051, 2551, 15303)]  # ceil(x / 4)
    assert [m.total for m in mem] == sorted((m.total for m in mem), reverse=True)
    assert [m.total for m in zero_memory(parts, 1)] == [p + g + o] * 4  # one GPU: nothing to partition
    with pytest.raises(ValueError):
        zero_memory(parts, 0)


def test_cli_with_tiny_config(tiny, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", tiny["clip_nw"], tiny["llama_nw"], train={"precision": "bf16"})
    assert info_main([str(path), "--world-size", "2", "--stage.train_llm", "true"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path, ["--stage.train_llm", "true"])
    parts = model_sizes(cfg)
    for p in parts:
        assert f"{p.params:,}" in out
    total = sum(p.params for p in parts)
    assert f"{total:,}" in out and "world size 2, precision bf16" in out
    assert "train_llm=True" in out and "NOT included: activations" in out
    rows = [line for line in out.splitlines() if re.match(r"[0-3]( \*)? +[0-9]", line)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"] and rows[0].startswith("0 *")  # * = configured stage
    assert info_main([str(path), "--world-size", "0"]) == 2
    assert info_main([str(tmp_path / "missing.yaml")]) == 2
    assert info_main(["--help"]) == 0


def test_environment_table_lists_devices_and_ops() -> None:
    from lvlm.info import GIB, OpStatus, format_environment

    out = format_environment({"python": "3.11.7", "torch": "2.x"},
                             [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory": 80 * GIB, "capability": "9.0"}],
                             "cuda", [OpStatus("FusedAdamBuilder", "fused_adam", True, False, True)])
    assert "cuda:0  NVIDIA H100 80GB HBM3  80.0 GiB  (sm 9.0)" in out and "1 CUDA device(s)" in out
    assert "accelerator: cuda" in out
    assert any(line.split() == ["fused_adam", "FusedAdamBuilder", "yes", "no", "yes"] for line in out.splitlines())
