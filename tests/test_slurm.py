"""The batch scripts in slurm/ on a real single-node Slurm cluster on loopback (not a mock).

    sudo tests/slurm/cluster.sh install && sudo tests/slurm/cluster.sh up   # Debian 12, Slurm 22.05
    .venv/bin/python -m pytest -m slurm tests/test_slurm.py                  # ~4 min on 2 cores
    sudo tests/slurm/cluster.sh down

Skipped, with the reason, when no cluster answers `sinfo` (failed instead with
VAE_DIST_REQUIRE_SLURM=1). Jobs run as CPU jobs: CPU=1, two training processes in a gloo group, on
tiny generated MNIST files. The multi-node script is checked through the command it builds from a
given Slurm environment (DRY_RUN=1) and run for real on one node; the tests marked `multinode` run it
on several nodes, each a network namespace with its own hostname and slurmd (skipped unless
`SLURM_TEST_NODES=3 tests/slurm/cluster.sh up` made them):

    sudo SLURM_TEST_NODES=3 tests/slurm/cluster.sh up
    .venv/bin/python -m pytest -m "slurm and multinode" tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_mnist


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when a node answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed (no sbatch/sinfo); as root: tests/slurm/cluster.sh install && tests/slurm/cluster.sh up"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s: is slurmctld running? (tests/slurm/cluster.sh up)"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable Slurm node (sinfo: {(proc.stdout + proc.stderr).strip()[:200]!r}); start one with tests/slurm/cluster.sh up"
    return None


PROBLEM = cluster_problem()
# CI sets VAE_DIST_REQUIRE_SLURM=1 after bringing the cluster up: then a missing cluster fails the
# tests instead of skipping them.
REQUIRED = os.environ.get("VAE_DIST_REQUIRE_SLURM") == "1"
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PROBLEM is not None and not REQUIRED, reason=PROBLEM or "")]

SINGLE = REPO / "slurm" / "train_single_node.sbatch"
MULTI = REPO / "slurm" / "train_multi_node.sbatch"
NODE_TASK = REPO / "slurm" / "node_task.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(data: Path, **extra: object) -> list[str]:
    """A seconds-long run: 400 examples, tiny model; train.batch_size=20 gives 20 steps per epoch."""
    base = {
        "data.root": data,
        "data.download": "false",
        "model.hidden_dims": "[64,32]",
        "train.batch_size": 20,
        "train.eval_batch_size": 150,
        "tracking.mode": "off",
        "tracking.log_every_steps": 10,
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def submit(script: Path, run_dir: Path, log: Path, args: list[str], *sbatch_opts: str, gpus: int = 2) -> str:
    """sbatch a CPU job (`gpus` training processes per node) from the repository root; returns the job id."""
    env = {**os.environ, "CPU": "1", "GPUS": str(gpus), "MAIN_PORT": str(free_port()), "RUN_DIR": str(run_dir)}
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={log}",
            *sbatch_opts,
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    return proc.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job log tail:\n{tail}")


# What a stopped run says about its checkpoint: saved now, or (a signal that lands right after an
# epoch-end save) the checkpoint of that same step, already on disk.
STOPPED_AT = r"(?:checkpoint saved to|no step ran since the checkpoint) "


def job_gone(job: str) -> bool:
    return job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "")


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["split"] == "train"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_mnist(tmp_path / "data")


@pytest.fixture
def jobs():
    """Job ids a test submitted; cancelled at the end so a failed test leaves nothing running."""
    ids: list[str] = []
    yield ids
    for job in ids:
        subprocess.run(["scancel", job], capture_output=True)


def test_single_node_script_trains_to_the_end(data: Path, tmp_path: Path, jobs: list[str]) -> None:
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(SINGLE, run, log, overrides(data, **{"train.epochs": 1})))
    wait_for(lambda: job_gone(job), 120, f"job {job} to end", log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED" and job_field(job, "ExitCode") == "0:0", text[-3000:]
    assert "restart 0" in text and "slurm: training finished" in text
    assert train_steps(run)[-1] == 20 and (run / "model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-00000020" / "state.json").read_text())
    assert state["num_processes"] == 2  # a real two-process gloo group, not one process twice


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_parameters(
    data: Path, tmp_path: Path, jobs: list[str]
) -> None:
    args = overrides(data, **{"train.epochs": 10})  # 200 steps, ~5 s of training
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(SINGLE, run, log, args))
    wait_for(lambda: any(s >= 30 for s in train_steps(run)), 120, "30 training steps", log)
    # What --signal=B:USR1@N does before the time limit, now: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: "slurm: requeueing job" in log.read_text(), 60, "the job to requeue itself", log)
    requeued = time.monotonic()

    # Meanwhile (the requeued job waits ~15 s to start again), the same run without interruption.
    ref = tmp_path / "ref"
    env = {**os.environ, "CPU": "1", "GPUS": "2", "MAIN_PORT": str(free_port()), "RUN_DIR": str(ref)}
    reference = subprocess.run(
        [str(REPO / "launch" / "single_box.sh"), *args], capture_output=True, text=True, env=env, timeout=180
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    wait_for(lambda: "restart 1 " in log.read_text(), 120, "the requeued job to start", log)
    restart_s = time.monotonic() - requeued
    wait_for(lambda: job_gone(job), 120, f"job {job} to end", log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert job_field(job, "Restarts") == "1"  # the log's "restart 1" is SLURM_RESTART_COUNT=1
    saved = re.search(STOPPED_AT + r"\S*step-(\d+)", text)
    assert saved and 30 <= int(saved.group(1)) < 200, text[-3000:]  # stopped mid-run, after the signal
    assert text.count("slurm: training finished") == 1
    assert train_steps(run)[-1] == 200 and train_steps(run) == sorted(set(train_steps(run)))
    final, expected = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    print(f"requeued job started again {restart_s:.1f} s after the requeue")


def test_scancel_saves_a_checkpoint_and_is_not_requeued(data: Path, tmp_path: Path, jobs: list[str]) -> None:
    """`scancel JOB` must still cancel a job that requeues itself on TERM."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(SINGLE, run, log, overrides(data, **{"train.epochs": 10})))
    wait_for(lambda: any(s >= 30 for s in train_steps(run)), 120, "30 training steps", log)
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: job_gone(job), 60, f"job {job} to end", log)
    text = log.read_text()
    assert job_field(job, "JobState") == "CANCELLED" and job_field(job, "Restarts") == "0", text[-3000:]
    assert "the job was cancelled: not requeueing" in text
    saved = re.search(STOPPED_AT + r"(\S*step-\d+)", text)
    assert saved and Path(saved.group(1)).is_dir(), text[-3000:]


def test_multi_node_script_runs_through_srun_and_requeues_on_usr1(data: Path, tmp_path: Path, jobs: list[str]) -> None:
    """On one node: srun, node_task.sh, a c10d rendezvous on the head node, and USR1 forwarded by srun."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(MULTI, run, log, overrides(data, **{"train.epochs": 10}), "--nodes=1"))
    wait_for(lambda: any(s >= 30 for s in train_steps(run)), 120, "30 training steps", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: job_gone(job) and job_field(job, "Restarts") == "1", 150, "the requeued job to end", log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert "head node " in text and "1 nodes x 2 processes" in text
    assert re.search(STOPPED_AT + r"\S*step-\d+", text) and "restart 1 " in text
    assert train_steps(run)[-1] == 200


def dry_run(env: dict[str, str], *args: str, script: Path = MULTI) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, cwd=REPO, env={**base, "DRY_RUN": "1", **env}
    )


def test_multi_node_builds_one_rendezvous_for_all_nodes() -> None:
    """What the job would run on each of two nodes gpu01, gpu02 with 4 GPUs each."""
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16"}
    proc = dry_run({**slurm, "MAIN_IP": "10.0.0.1", "GPUS": "4"}, "train.epochs=3")
    assert proc.returncode == 0, proc.stderr
    assert "head node gpu01 (10.0.0.1:29500), 2 nodes x 4 processes" in proc.stdout
    srun = proc.stdout.strip().splitlines()[-1].split()
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
    assert srun[5:] == ["slurm/node_task.sh", "train.resume=auto", "train.epochs=3"]
    # Each node's task reads its own SLURM_NODEID: ranks 0 and 1, one rendezvous on gpu01.
    for node in (0, 1):
        env = {**slurm, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": str(node)}
        env |= {"MAIN_IP": "10.0.0.1", "MAIN_PORT": "29500", "GPUS": "4", "RUN_DIR": "runs/slurm-77"}
        task = dry_run(env, *srun[6:], script=NODE_TASK)
        assert task.returncode == 0, task.stderr
        cmd = task.stdout.split()
        flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        assert flag["--num_machines"] == "2" and flag["--machine_rank"] == str(node)
        assert flag["--num_processes"] == "8"  # over all nodes
        assert flag["--main_process_ip"] == "10.0.0.1" and flag["--rdzv_backend"] == "c10d"
        assert cmd[-3:] == ["run.dir=runs/slurm-77", "train.resume=auto", "train.epochs=3"]


def test_multi_node_refuses_a_head_node_that_resolves_to_loopback() -> None:
    """The known hang: every node waiting for the rendezvous on itself. Refused before srun."""
    env = {"SLURM_JOB_ID": "78", "SLURM_JOB_NODELIST": "localhost,gpu02", "SLURM_NNODES": "2"}
    proc = dry_run(env)
    assert proc.returncode == 2 and "resolves to 127.0.0.1 (loopback)" in proc.stderr and "MAIN_IP" in proc.stderr
    assert "srun" not in proc.stdout
    unresolvable = dry_run({**env, "SLURM_JOB_NODELIST": "nosuchnode[1-2]"})
    assert (
        unresolvable.returncode == 2 and "does not resolve" in unresolvable.stderr and "MAIN_IP" in unresolvable.stderr
    )


# ------------------------------------------------------------------ seeds as an array
SEEDS = REPO / "slurm" / "train_seeds.sbatch"


def array_states(job: str) -> list[str]:
    """JobState of every task of array job `job` (scontrol shows one record per task)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.findall(r"\bJobState=(\S+)", out)


def test_an_array_of_three_smoke_seeds_gives_three_runs_in_one_group_and_a_table(
    data: Path, tmp_path: Path, jobs: list[str]
) -> None:
    """sbatch --array=0-2: task i trains seed 10 + i into <RUN_DIR>/seed-<10 + i>, all in the W&B group
    "sweep"; vae-results over them prints n = 3 with the mean and std of the three final test ELBOs."""
    from vae_dist.tracking import local_runs, read_wandb_run

    sweep = tmp_path / "sweep"
    wandb_home = tmp_path / "wandb_home"
    env = {
        **os.environ,
        "CPU": "1",
        "CONFIG": "configs/smoke.yaml",
        "RUN_DIR": str(sweep),
        "BASE_SEED": "10",
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
    }
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        env.pop(var, None)
    args = [f"data.root={data}", "data.download=false", "model.hidden_dims=[64,32]", "train.cpu_threads=1"]
    args.append("tracking.mode=offline")
    log = tmp_path / "task-%a.out"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}"]
        + [str(SEEDS), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    jobs.append(job := proc.stdout.strip().split(";")[0])
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    first_log = tmp_path / "task-0.out"
    wait_for(lambda: all(s in done for s in array_states(job)), 240, "the array to end", first_log)
    states = array_states(job)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("task-*.out")))
    assert states == [] or states == ["COMPLETED"] * 3, logs

    finals, groups, names = [], set(), []
    for task, seed in enumerate((10, 11, 12)):
        run = sweep / f"seed-{seed}"
        text = (tmp_path / f"task-{task}.out").read_text()
        assert f"array task {task} of job {job}" in text and "slurm: training finished" in text, text[-3000:]
        config = (run / "config.yaml").read_text()
        assert f"seed: {seed}\n" in config and f"dir: {run}\n" in config
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        finals.append([r for r in rows if r["split"] == "test"][-1]["elbo"])
        [folder] = local_runs(run)
        wandb_run = read_wandb_run(folder)
        groups.add(wandb_run["group"])
        names.append(wandb_run["name"])
    assert groups == {"sweep"} and names == ["seed-10", "seed-11", "seed-12"]
    assert len(set(finals)) == 3  # three seeds, three draws

    table = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.results", str(sweep), "--json"], capture_output=True, text=True, cwd=REPO
    )
    assert table.returncode == 0, table.stderr
    [row] = json.loads(table.stdout)["groups"]
    assert row["n"] == 3 and row["seeds"] == [10, 11, 12]
    assert row["final_elbo"]["mean"] == pytest.approx(statistics.fmean(finals), rel=1e-12)
    assert row["final_elbo"]["std"] == pytest.approx(statistics.stdev(finals), rel=1e-12)
    markdown = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.results", str(sweep)], capture_output=True, text=True
    )
    mean, std = statistics.fmean(finals), statistics.stdev(finals)
    assert f"| {sweep}/seed-{{10,11,12}} | 3 | {mean:.2f} ± {std:.2f} " in markdown.stdout


def test_an_array_task_is_refused_outside_an_array() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SEEDS)], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "not an array task: submit with sbatch --array=0-N" in proc.stderr


def test_an_array_task_requeues_itself_on_usr1_and_resumes_its_own_seed(
    data: Path, tmp_path: Path, jobs: list[str]
) -> None:
    """The time-limit path, per task: USR1 to task 1's batch shell checkpoints it, requeues that task
    only, and the requeued task resumes the same seed in the same run.dir to the end."""
    sweep, log = tmp_path / "sweep", tmp_path / "task.out"
    env = {**os.environ, "CPU": "1", "RUN_DIR": str(sweep)}
    args = overrides(data, **{"train.epochs": 10, "train.cpu_threads": 1})  # 200 steps, ~5 s of training
    proc = subprocess.run(
        ["sbatch", "--parsable", "--array=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}"]
        + [str(SEEDS), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    jobs.append(array := proc.stdout.strip().split(";")[0])
    task, run = f"{array}_1", sweep / "seed-1"
    wait_for(lambda: any(s >= 30 for s in train_steps(run)), 120, "30 training steps", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)
    wait_for(lambda: "slurm: requeueing job" in log.read_text(), 60, "the task to requeue itself", log)
    wait_for(lambda: job_field(task, "Restarts") == "1" and job_gone(task), 150, "the requeued task to end", log)
    text = log.read_text()
    assert job_field(task, "JobState") == "COMPLETED", text[-3000:]
    assert "restart 1 " in text and re.search(STOPPED_AT + r"\S*seed-1/checkpoints/step-\d+", text)
    assert train_steps(run)[-1] == 200 and train_steps(run) == sorted(set(train_steps(run)))
    assert "seed: 1\n" in (run / "config.yaml").read_text() and sorted(p.name for p in sweep.iterdir()) == ["seed-1"]


def namespace_nodes() -> list[str]:
    """The idle nodes of a `SLURM_TEST_NODES=N tests/slurm/cluster.sh up` cluster (vaenode1..N)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
    return [
        n for n, state in (line.split() for line in out.splitlines()) if n.startswith("vaenode") and state == "idle"
    ]


def needs_nodes(n: int) -> None:
    if len(namespace_nodes()) < n and not (REQUIRED and os.environ.get("SLURM_TEST_NODES")):
        pytest.skip(f"needs {n} idle namespace nodes: SLURM_TEST_NODES={n} tests/slurm/cluster.sh up (as root)")


def one_process_weights(data: Path, run_dir: Path, args: list[str]) -> dict[str, torch.Tensor]:
    """The same run in one process: what the multi-node jobs must end equal to (to 1e-5, fp32)."""
    cmd = [sys.executable, "-m", "vae_dist.cli.train", *args, f"run.dir={run_dir}", "train.device=cpu"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(run_dir / "model.safetensors"))


def assert_close(ref: dict[str, torch.Tensor], run_dir: Path) -> None:
    got = load_file(str(run_dir / "model.safetensors"))
    for key, value in ref.items():
        rel = ((got[key] - value).norm() / value.norm()).item()
        assert rel < 1e-5, (key, rel)


NODES_SH = REPO / "tests" / "cluster" / "nodes.sh"
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"


@pytest.mark.multinode
def test_multi_node_job_on_two_nodes_trains_like_one_process(data: Path, tmp_path: Path, jobs: list[str]) -> None:
    needs_nodes(2)
    args = overrides(data, **{"train.batch_size": 100, "train.epochs": 2, "tracking.log_every_steps": 4})
    ref = one_process_weights(data, tmp_path / "one", args)
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(MULTI, run, log, args, "--nodes=2", "--cpus-per-task=1", gpus=1))
    wait_for(lambda: job_gone(job), 240, "the two-node job to end", log)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert "2 nodes x 1 processes" in text and re.search(r"on vaenode\[\d-\d\]|on vaenode\d,vaenode\d", text), text
    assert_close(ref, run)


@pytest.mark.multinode
def test_a_node_failure_requeues_the_job_which_finishes_with_the_same_numbers(
    data: Path, tmp_path: Path, jobs: list[str]
) -> None:
    """kill -9 of everything on one of the job's two nodes (its slurmd too): the other node's process
    exits 76 within seconds, Slurm marks the node DOWN after SlurmdTimeout and requeues the job, which
    resumes on the two nodes left and ends equal to one process's run."""
    needs_nodes(3)
    args = overrides(data, **{"train.batch_size": 100, "train.epochs": 40, "tracking.log_every_steps": 4})
    args.append("dist.timeout_s=12")
    ref = one_process_weights(data, tmp_path / "one", args)
    run, log = tmp_path / "run", tmp_path / "job.out"
    jobs.append(job := submit(MULTI, run, log, args, "--nodes=2", "--cpus-per-task=1", gpus=1))
    wait_for(lambda: any(s >= 80 for s in train_steps(run)), 180, "80 training steps", log)
    nodelist = subprocess.run(
        ["scontrol", "show", "hostnames", job_field(job, "NodeList")], capture_output=True, text=True
    )
    victim = nodelist.stdout.split()[1]  # not the batch host: the job's log stays in one piece
    subprocess.run([str(NODES_SH), "crash", victim], check=True)
    try:
        wait_for(lambda: job_field(job, "Restarts") == "1", 120, f"the requeue after {victim} failed", log)
        wait_for(lambda: job_gone(job), 240, "the requeued job to end", log)
    finally:
        subprocess.run([str(CLUSTER_SH), "start-node", victim], capture_output=True)  # the node back for later tests
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert "stopped answering (" in text and "restart 1 on" in text, text[-3000:]
    assert victim not in text.split("restart 1 on")[1].splitlines()[0]  # the requeued job ran elsewhere
    steps = train_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 160, steps
    assert_close(ref, run)
