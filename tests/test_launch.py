"""The launch helpers (launch/, slurm/node_task.sh) and the accelerate config files (configs/accelerate/).

    .venv/bin/python -m pytest tests/test_launch.py

Commands are checked with DRY_RUN=1 (printed, not run); one real two-process launch checks that
configs/accelerate/cpu.yaml gives a gloo group of two. No Slurm needed: the scripts under test
read SLURM_* variables only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SINGLE_BOX = REPO / "launch" / "single_box.sh"
MULTI_BOX = REPO / "launch" / "multi_box.sh"
NODE_TASK = REPO / "slurm" / "node_task.sh"
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def dry_run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run a launch script with DRY_RUN=1 in a clean environment (no SLURM_*, no GPU settings)."""
    keep = ("PATH", "HOME", "LANG", "VIRTUAL_ENV")
    base = {k: os.environ[k] for k in keep if k in os.environ}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env={**base, "DRY_RUN": "1", **env}
    )


def flags(cmd: str) -> dict[str, str]:
    words = cmd.split()
    return {
        w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--") and not words[i + 1].startswith("--")
    }


def test_single_box_uses_all_given_processes_and_passes_overrides() -> None:
    proc = dry_run(SINGLE_BOX, {"GPUS": "4", "CONFIG": "configs/smoke.yaml", "RUN_DIR": "runs/x"}, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip()
    assert cmd.startswith("accelerate launch --multi_gpu ") and flags(cmd)["--num_processes"] == "4"
    assert cmd.endswith("vae_dist/train.py --config configs/smoke.yaml run.dir=runs/x train.epochs=2")


def test_single_box_one_gpu_drops_multi_gpu_and_cpu_mode_hides_gpus() -> None:
    one = dry_run(SINGLE_BOX, {"GPUS": "1"})
    assert one.returncode == 0 and "--multi_gpu" not in one.stdout  # accelerate refuses --multi_gpu with 1 process
    cpu = dry_run(SINGLE_BOX, {"CPU": "1"})
    assert cpu.returncode == 0 and "--multi_gpu" in cpu.stdout and flags(cpu.stdout)["--num_processes"] == "2"
    assert "--cpu" not in cpu.stdout.split()  # accelerate's --cpu starts a single process


def test_single_box_without_gpus_says_what_to_set() -> None:
    proc = dry_run(SINGLE_BOX, {"PATH": "/usr/bin:/bin", "DRY_RUN": "0"})  # no nvidia-smi on this PATH
    if proc.returncode != 2 and "nvidia-smi" not in proc.stderr:
        pytest.skip("nvidia-smi found GPUs in /usr/bin")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "single_box.sh: error: no GPU found (nvidia-smi): set GPUS=N, or CPU=1 for CPU processes.\n"


@pytest.mark.parametrize("script", [SINGLE_BOX, MULTI_BOX], ids=lambda p: p.name)
def test_a_dry_run_without_gpus_still_prints_the_command(script: Path) -> None:
    """The scripts' own example, DRY_RUN=1, on a CPU machine: the command for 8 GPUs, and a note saying so."""
    env = {"PATH": "/usr/bin:/bin", "MAIN_IP": "10.0.0.1", "NUM_MACHINES": "2", "MACHINE_RANK": "0"}
    proc = dry_run(script, env)
    if "no GPU found" not in proc.stderr:
        pytest.skip("nvidia-smi found GPUs in /usr/bin")
    # multi_box.sh: accelerate launch through vae_dist.cli.machines (what several machines need on top)
    launcher = "accelerate launch" if script == SINGLE_BOX else "python -m vae_dist.cli.machines"
    assert proc.returncode == 0 and proc.stdout.startswith(f"{launcher} --multi_gpu ")
    assert flags(proc.stdout)["--num_processes"] == ("8" if script == SINGLE_BOX else "16")
    assert "the command below is for GPUS=8" in proc.stderr and "set GPUS=N" in proc.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {},
            "multi_box.sh: error: set NUM_MACHINES (the number of machines taking part), MACHINE_RANK (0 on the "
            "MAIN_IP machine, 1 .. NUM_MACHINES-1 on the others), MAIN_IP (the address of the MACHINE_RANK=0 "
            "machine, reachable from every machine) on every machine, e.g. MAIN_IP=10.0.0.1 NUM_MACHINES=2 "
            "MACHINE_RANK=0 launch/multi_box.sh.",
        ),
        ({"MAIN_IP": "10.0.0.1", "MACHINE_RANK": "0"}, "multi_box.sh: error: set NUM_MACHINES (the number"),
        ({"MAIN_IP": "10.0.0.1", "NUM_MACHINES": "two", "MACHINE_RANK": "0"}, "NUM_MACHINES=two is not a number"),
        ({"MAIN_IP": "10.0.0.1", "NUM_MACHINES": "2", "MACHINE_RANK": "first"}, "MACHINE_RANK=first is not a rank"),
        ({"MAIN_IP": "10.0.0.1", "NUM_MACHINES": "2", "MACHINE_RANK": "0", "GPUS": "all"}, "GPUS=all is not a number"),
    ],
)
def test_multi_box_missing_or_malformed_settings_are_one_sentence_exit_2(env: dict[str, str], message: str) -> None:
    proc = dry_run(MULTI_BOX, {"GPUS": "8", **env})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("multi_box.sh: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_single_box_malformed_gpus_is_one_sentence_exit_2() -> None:
    proc = dry_run(SINGLE_BOX, {"GPUS": "eight"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "single_box.sh: error: GPUS=eight is not a number of processes: set GPUS=N (N >= 1).\n"


@pytest.mark.parametrize("rank", [0, 1])
def test_multi_box_builds_the_rendezvous(rank: int) -> None:
    env = {"MAIN_IP": "10.0.0.1", "MAIN_PORT": "29555", "NUM_MACHINES": "2", "MACHINE_RANK": str(rank), "GPUS": "8"}
    proc = dry_run(MULTI_BOX, env, "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    f = flags(proc.stdout)
    assert f["--num_processes"] == "16" and f["--num_machines"] == "2" and f["--machine_rank"] == str(rank)
    assert (
        f["--main_process_ip"] == "10.0.0.1" and f["--main_process_port"] == "29555" and f["--rdzv_backend"] == "c10d"
    )
    assert f["--rdzv_conf"] == "join_timeout=600"  # JOIN_TIMEOUT_S's default
    assert "--multi_gpu" in proc.stdout and proc.stdout.split()[-1] == "train.epochs=1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAIN_IP": "127.0.0.1", "NUM_MACHINES": "2", "MACHINE_RANK": "1"}, "loopback"),
        ({"MAIN_IP": "localhost", "NUM_MACHINES": "2", "MACHINE_RANK": "0"}, "loopback"),
        ({"MAIN_IP": "10.0.0.1", "NUM_MACHINES": "2", "MACHINE_RANK": "2"}, "outside 0 .. 1"),
        ({"NUM_MACHINES": "2", "MACHINE_RANK": "0"}, "set MAIN_IP"),
    ],
)
def test_multi_box_refuses_settings_that_would_hang(env: dict[str, str], message: str) -> None:
    proc = dry_run(MULTI_BOX, {"GPUS": "8", **env})
    assert proc.returncode == 2 and message in proc.stderr and "accelerate" not in proc.stdout, proc.stderr


def test_node_task_takes_its_rank_from_its_own_slurm_nodeid() -> None:
    slurm = {"SLURM_STEP_ID": "0", "SLURM_NNODES": "3", "SLURM_NTASKS": "3", "SLURM_NODEID": "2"}
    proc = dry_run(NODE_TASK, {**slurm, "MAIN_IP": "10.0.0.1", "GPUS": "4"}, "train.resume=auto")
    assert proc.returncode == 0, proc.stderr
    f = flags(proc.stdout)
    assert f["--machine_rank"] == "2" and f["--num_machines"] == "3" and f["--num_processes"] == "12"


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        # The batch shell has SLURM_NODEID=0 but no step: without srun every node would be rank 0.
        ({"SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "0"}, "start this script with srun"),
        ({"SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NODEID": "0"}, "one per node"),
    ],
)
def test_node_task_refuses_to_run_outside_one_srun_task_per_node(slurm: dict[str, str], message: str) -> None:
    proc = dry_run(NODE_TASK, {**slurm, "MAIN_IP": "10.0.0.1", "GPUS": "4"})
    assert proc.returncode == 2 and message in proc.stderr and "accelerate" not in proc.stdout, proc.stderr


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_comment_every_key(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.compute_environment == "LOCAL_MACHINE" and cfg.num_processes >= 1
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    uncommented = [ln for ln in lines if "#" not in ln]
    # distributed_type of cpu.yaml is explained in the comment block above it.
    assert [ln for ln in uncommented if not ln.startswith("distributed_type:")] == [], path.name
    assert re.search(r"^# .*accelerate launch --config_file configs/accelerate/" + path.name, path.read_text(), re.M)


def test_accelerate_config_files_cover_the_launch_modes() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfgs = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS}
    assert cfgs["single_gpu"].distributed_type == "NO" and cfgs["single_gpu"].num_processes == 1
    assert {cfgs["multi_gpu_fp16"].mixed_precision, cfgs["multi_gpu_bf16"].mixed_precision} == {"fp16", "bf16"}
    assert cfgs["multi_node"].num_machines > 1 and cfgs["multi_node"].rdzv_backend == "c10d"
    assert cfgs["cpu"].distributed_type == "MULTI_GPU" and not cfgs["cpu"].use_cpu


PROBE = """
import json, os, sys, torch
from accelerate import PartialState
state = PartialState(cpu=not torch.cuda.is_available())  # as vae_dist.run.build_state
out = {"processes": state.num_processes, "backend": state.backend, "device": state.device.type}
open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w").write(json.dumps(out))
"""


@pytest.mark.distributed
def test_cpu_accelerate_config_starts_a_two_process_gloo_group(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    proc = subprocess.run(
        [*accelerate, "--config_file", str(REPO / "configs/accelerate/cpu.yaml"), "--main_process_port", str(port)]
        + [str(tmp_path / "probe.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"processes": 2, "backend": "gloo", "device": "cpu"}] * 2
