"""launch/*: each launcher's DRY_RUN=1 line is the exact command it runs, overrides pass through unchanged.

Every script is run for real too, with fake ``torchrun`` / ``deepspeed`` / ``srun`` / ``scontrol`` /
``nvidia-smi`` first on PATH: the argv the fake receives must equal the DRY_RUN line split by shlex.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
OVERRIDES = ["--optim.lr", "1e-4", "--run_dir", "runs/it's a b", "--stage.name", ""]
RECORD = '#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0")" "$@"\necho "CVD=${CUDA_VISIBLE_DEVICES-unset}" >&2\n'


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH folder with recording torchrun/deepspeed, a 4-GPU nvidia-smi and a 2-node scontrol."""
    b = tmp_path / "bin"
    b.mkdir()
    for name in ("torchrun", "deepspeed"):
        _fake(b, name, RECORD)
    _fake(b, "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    _fake(b, "scontrol", "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\necho gpu-node-07\necho gpu-node-08\n")
    # srun: drop its own options, run the task as node 1 of the allocation
    _fake(b, "srun", '#!/usr/bin/env bash\nwhile [[ "$1" != bash ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    return b


def run(script: str, args: list[str], fake_bin: Path, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp")}
    base.update(env)
    if dry:
        base["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=base, capture_output=True, text=True,
                          timeout=60)


def dry_argv(script: str, args: list[str], fake_bin: Path, **env: str) -> list[str]:
    proc = run(script, args, fake_bin, **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # one line, shell-quoted
    argv = shlex.split(lines[0])
    if script != "slurm.sbatch":  # (srun's task command is checked in test_slurm_srun_command)
        real = run(script, args, fake_bin, dry=False, **env)  # what actually runs
        assert real.returncode == 0, real.stderr
        executed = real.stdout.splitlines()
        assert argv[argv.index(executed[0]):] == executed  # after `env VAR=value ...` in cpu_debug.sh
    return argv


def test_torchrun_single_node_uses_every_gpu(fake_bin: Path) -> None:
    argv = dry_argv("torchrun.sh", ["cfg.yaml", *OVERRIDES], fake_bin)
    assert argv == ["torchrun", "--nnodes", "1", "--nproc_per_node", "4", "--standalone", "-m", "lvlm", "train",
                    "cfg.yaml", *OVERRIDES]


@pytest.mark.parametrize("env, nproc", [({"CUDA_VISIBLE_DEVICES": "2,5"}, "2"), ({"NPROC": "3"}, "3")])
def test_torchrun_process_count(fake_bin: Path, env: dict, nproc: str) -> None:
    argv = dry_argv("torchrun.sh", ["cfg.yaml"], fake_bin, **env)
    assert argv[argv.index("--nproc_per_node") + 1] == nproc


def test_no_gpu_means_one_process(fake_bin: Path) -> None:
    _fake(fake_bin, "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    argv = dry_argv("torchrun.sh", ["cfg.yaml"], fake_bin)
    assert argv[argv.index("--nproc_per_node") + 1] == "1"
    argv = dry_argv("deepspeed.sh", ["cfg.yaml"], fake_bin)
    assert argv[argv.index("--num_gpus") + 1] == "1"


def test_torchrun_multi_node_from_env(fake_bin: Path) -> None:
    argv = dry_argv("torchrun.sh", ["cfg.yaml", *OVERRIDES], fake_bin, NNODES="4", NODE_RANK="2", NPROC="8",
                    MASTER_ADDR="10.1.2.3", MASTER_PORT="29611")
    assert argv == ["torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--node_rank", "2", "--rdzv_backend",
                    "c10d", "--rdzv_endpoint", "10.1.2.3:29611", "--rdzv_id", "lvlm", "-m", "lvlm", "train",
                    "cfg.yaml", *OVERRIDES]


def test_torchrun_multi_node_needs_rank_and_master(fake_bin: Path) -> None:
    proc = run("torchrun.sh", ["cfg.yaml"], fake_bin, NNODES="2", MASTER_ADDR="h")
    assert proc.returncode != 0 and "NODE_RANK" in proc.stderr and not proc.stdout
    proc = run("torchrun.sh", ["cfg.yaml"], fake_bin, NNODES="2", NODE_RANK="0")
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr


def test_deepspeed_hostfile(fake_bin: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-07 slots=8\ngpu-node-08 slots=8\n")
    argv = dry_argv("deepspeed.sh", ["cfg.yaml", *OVERRIDES], fake_bin, HOSTFILE=str(hostfile))
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--master_port", "29500", "--module", "lvlm",
                    "train", "cfg.yaml", *OVERRIDES]
    argv = dry_argv("deepspeed.sh", ["cfg.yaml"], fake_bin, HOSTFILE=str(hostfile), MASTER_ADDR="gpu-node-08")
    assert argv[:5] == ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "gpu-node-08"]
    proc = run("deepspeed.sh", ["cfg.yaml"], fake_bin, HOSTFILE=str(tmp_path / "missing"))
    assert proc.returncode == 2 and "HOSTFILE" in proc.stderr


def test_deepspeed_single_node(fake_bin: Path) -> None:
    assert dry_argv("deepspeed.sh", ["cfg.yaml", *OVERRIDES], fake_bin) == [
        "deepspeed", "--num_gpus", "4", "--master_port", "29500", "--module", "lvlm", "train", "cfg.yaml", *OVERRIDES]
    argv = dry_argv("deepspeed.sh", ["cfg.yaml"], fake_bin, NUM_GPUS="2")
    assert argv[argv.index("--num_gpus") + 1] == "2"


def test_cpu_debug_hides_gpus(fake_bin: Path) -> None:
    argv = dry_argv("cpu_debug.sh", ["cfg.yaml", *OVERRIDES], fake_bin, CUDA_VISIBLE_DEVICES="0")
    assert argv == ["env", "CUDA_VISIBLE_DEVICES=", "DS_ACCELERATOR=cpu", "torchrun", "--standalone", "--nnodes",
                    "1", "--nproc_per_node", "2", "-m", "lvlm", "train", "cfg.yaml", *OVERRIDES]
    real = run("cpu_debug.sh", ["cfg.yaml"], fake_bin, dry=False, CUDA_VISIBLE_DEVICES="0")
    assert "CVD=\n" in real.stderr  # torchrun really ran with no GPU visible
    argv = dry_argv("cpu_debug.sh", ["cfg.yaml"], fake_bin, NPROC="3")
    assert argv[argv.index("--nproc_per_node") + 1] == "3"


def test_slurm_srun_command(fake_bin: Path) -> None:
    slurm = {"SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "8"}
    argv = dry_argv("slurm.sbatch", ["cfg.yaml", *OVERRIDES], fake_bin, **slurm)
    assert argv[:7] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "bash"]
    assert argv[7] == "-c" and argv[9:] == ["lvlm-task", "cfg.yaml", *OVERRIDES]
    task = argv[8]  # run on every node; the node rank is expanded there
    assert '--node_rank "$SLURM_NODEID"' in task
    assert "--rdzv_backend c10d --rdzv_endpoint gpu-node-07:29500 --rdzv_id 4242" in task
    # run for real through the fake srun (as node 1): torchrun receives every argument unchanged
    real = run("slurm.sbatch", ["cfg.yaml", *OVERRIDES], fake_bin, dry=False, **slurm)
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines() == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "1", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-node-07:29500", "--rdzv_id", "4242", "-m", "lvlm", "train", "cfg.yaml", *OVERRIDES]


def test_slurm_script_shape(fake_bin: Path) -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time="):
        assert f"#SBATCH {directive}" in text
    assert "scontrol show hostnames" in text
    proc = run("slurm.sbatch", ["cfg.yaml"], fake_bin)  # outside an allocation: a clear refusal
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST" in proc.stderr
    # a long node list: `scontrol | head -n1` must not fail on SIGPIPE under pipefail
    _fake(fake_bin, "scontrol", "#!/bin/sh\nseq -f 'node%06g' 1 200000\n")
    argv = dry_argv("slurm.sbatch", ["cfg.yaml"], fake_bin, SLURM_JOB_NODELIST="node[000001-200000]",
                    SLURM_NNODES="200000", NPROC="8")
    assert "--rdzv_endpoint node000001:29500" in argv[8]


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "cpu_debug.sh", "slurm.sbatch"])
def test_config_is_required(fake_bin: Path, script: str) -> None:
    for args in ([], ["--optim.lr", "1e-4"]):
        proc = run(script, args, fake_bin)
        assert proc.returncode == 2 and "usage" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "cpu_debug.sh", "slurm.sbatch", "_common.sh"])
def test_scripts_are_strict_bash(script: str) -> None:
    path = LAUNCH / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "set -euo pipefail" in path.read_text()


KNOWN_TRANSITIVE = {"huggingface-hub", "hf-xet", "timm", "ftfy", "regex", "triton", "hjson", "ninja", "py-cpuinfo",
                    "psutil", "pydantic", "msgpack", "einops", "braceexpand"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_docker_lock_pins_the_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    root = LAUNCH.parent
    deps = {_norm(r.name): r for r in map(Requirement, tomllib.loads((root / "pyproject.toml").read_text())
                                          ["project"]["dependencies"])}
    lock_text = (root / "docker" / "requirements.lock").read_text()
    pins = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[_norm(name)] = version
    assert set(deps) <= set(pins), f"direct dependencies missing from the lock: {set(deps) - set(pins)}"
    assert set(pins) <= set(deps) | KNOWN_TRANSITIVE, f"unknown packages in the lock: {set(pins) - set(deps)}"
    for name, req in deps.items():
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"

    dockerfile = (root / "docker" / "Dockerfile").read_text()
    assert "COPY docker/requirements.lock" in dockerfile and "pip install -r /tmp/requirements.lock" in dockerfile
    assert "ARG FLASH_ATTN=0" in dockerfile and "WORKDIR /workspace" in dockerfile
    assert 'CMD ["lvlm", "--help"]' in dockerfile
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-devel", dockerfile)
    assert cuda and f"CUDA {cuda.group(1)} build" in lock_text  # torch's CUDA matches the base image
