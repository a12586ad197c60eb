"""Every way a run is stopped or doubled leaves it whole: a signal at any moment, a launcher
killed by a supervisor, a second run into the same run.dir, a run killed with -9. CPU processes.
Run: pytest tests/test_signals.py   (the launcher tests are marked distributed)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, cpu_env, run_train, train_in_process
from vae_dist.checkpoint import latest_valid, verify
from vae_dist.config import load_config
from vae_dist.tracking import local_runs, read_wandb_run
from vae_dist.trainer import Trainer

LONG = ["train.epochs=400", "tracking.log_every_steps=2"]  # trains until stopped


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "vae_dist.cli.train", *overrides]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared (exit code {proc.poll()})"


def processes_using(run_dir: Path) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line names run_dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(run_dir) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


# What `accelerate launch` itself exits with after a SIGTERM, by version (the shell shows -15 as 143):
# - one process, accelerate < 1.16: killed by the signal at once (-15); its training process, told by
#   the kernel (PR_SET_PDEATHSIG), still finishes its step, checkpoints and exits 75 on its own;
# - one process, accelerate >= 1.16: it sends SIGTERM to its whole process tree, waits up to 5 s (then
#   SIGKILL), and exits 128 + 15 = 143;
# - several processes (torchrun's agent forwards the signal and waits for its workers): 143 with
#   accelerate >= 1.16, 1 (an uncaught SignalException) before.
LAUNCHER_SIGTERM_CODES = {1: {-signal.SIGTERM, 128 + signal.SIGTERM}, 2: {1, 128 + signal.SIGTERM}}


def launcher_sigterm(nproc: int, overrides: list[str], tmp_path: Path, **env: str) -> dict:
    """tests/launcher_probe.py: `accelerate launch` training until SIGTERM reaches the launcher alone."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "launcher_probe.py"), str(nproc), str(run), str(tmp_path / "out")]
        + overrides,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cpu_env(**env),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["signalled"], report["stderr"]
    assert "stopped by SIGTERM at step" in report["stdout"], report["stdout"][-2000:] + report["stderr"]
    return report


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_the_launcher_checkpoints_and_leaves_no_process(
    nproc: int, tiny_overrides: list[str], tmp_path: Path
) -> None:
    """A supervisor signals the process it started: `accelerate launch`. Whatever the launcher's version
    does with the signal, the training process finishes its step, checkpoints and exits, and the
    launcher's own code is one that means 'terminated by SIGTERM' (LAUNCHER_SIGTERM_CODES)."""
    run = tmp_path / "run"
    report = launcher_sigterm(nproc, [*tiny_overrides, *LONG], tmp_path)
    assert report["launcher_code"] in LAUNCHER_SIGTERM_CODES[nproc], report["stderr"]
    # Processes the launcher left behind (accelerate < 1.16, one process) checkpointed and exited 75.
    assert all(o["code"] == 75 for o in report["orphans"]), report["orphans"]
    if report["launcher_code"] == -signal.SIGTERM:
        assert len(report["orphans"]) == 1
    saved = latest_valid(run)
    assert saved is not None and json.loads((saved / "state.json").read_text())["step"] > 0
    assert not (run / "model.safetensors").exists()  # stopped, not finished
    assert processes_using(run) == []


def wandb_train_steps(run: Path) -> list[int]:
    """The train steps the run's W&B folders hold, in the order they were logged; every folder exited."""
    steps = []
    for folder in local_runs(run):
        held = read_wandb_run(folder)
        assert held["exited"], f"{folder}: no exit record"
        steps += [row["train/step"] for row in held["history"] if "train/elbo" in row]
    return steps


def metrics_train_steps(run: Path) -> list[int]:
    return [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


@pytest.mark.distributed
def test_sigterm_to_the_launcher_leaves_a_whole_finished_wandb_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    """W&B's service is outside the training process's tree (vae_dist.wandb_service), so a launcher that
    signals the whole tree (accelerate >= 1.16) does not kill it first: the offline W&B run holds every
    train record up to the checkpoint and is finished; the service and its keeper exit by themselves."""
    run = tmp_path / "run"
    wait = {"PROBE_RECORDS": "40"}  # well past one 32 KiB block of the .wandb file
    report = launcher_sigterm(1, [*tiny_overrides, *LONG, "tracking.mode=offline"], tmp_path, **wait)
    assert all(o["code"] in (0, 75) for o in report["orphans"]), report["orphans"]  # the keeper and wandb-core: 0
    saved = json.loads((latest_valid(run) / "state.json").read_text())["step"]
    assert saved >= 60  # 40 lines: 8 epochs of 4 train records and a test record
    logged = metrics_train_steps(run)
    assert logged[-1] == saved and wandb_train_steps(run) == logged
    assert sum(f.stat().st_size for f in (run / "wandb").glob("offline-run-*/run-*.wandb")) > 32 * 1024


def test_a_killed_run_keeps_every_sent_record_in_wandb_and_resumes_it(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """kill -9 of a launcher's training process (a launcher's SIGKILL after its grace period): the W&B
    service outlives it and writes all it was sent, and the same command continues the W&B run from the
    checkpoint, so the W&B folders together hold every train step exactly once."""
    run = tmp_path / "run"
    launched = cpu_env(ACCELERATE_USE_CPU="True")  # what accelerate's one-process launcher sets
    overrides = [*tiny_overrides, *LONG, "tracking.mode=offline", "checkpoint.every_steps=10"]
    first = subprocess.Popen(
        train_cmd(overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launched, cwd=tmp_path
    )
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(metrics_train_steps(run)) >= 30:
            break
        time.sleep(0.1)
    first.kill()
    first.communicate()
    checkpoint = json.loads((latest_valid(run) / "state.json").read_text())["step"]
    deadline = time.time() + 60  # the keeper reads EOF and tears the service down (milliseconds here)
    while time.time() < deadline and not all(read_wandb_run(f)["exited"] for f in local_runs(run)):
        time.sleep(0.2)
    before = wandb_train_steps(run)
    assert [s for s in metrics_train_steps(run) if s <= checkpoint] == [s for s in before if s <= checkpoint]
    again = subprocess.run(
        train_cmd([o for o in overrides if not o.startswith("train.epochs")] + ["train.epochs=12"]),
        capture_output=True,
        text=True,
        env=launched,
        cwd=tmp_path,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(set(wandb_train_steps(run))) == wandb_train_steps(run) == list(range(2, 12 * 8 + 1, 2))


def test_signal_during_start_up_exits_75_and_writes_nothing(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd([*tiny_overrides, *LONG]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=cpu_env(),
    )
    # Wait until vae-train has its SIGTERM handler (the kernel's SigCgt mask shows it), which it
    # installs before importing torch: the signal then lands during the imports of start-up.
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines() if line.startswith("SigCgt"))
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM during start-up, before any training step" in err
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    assert latest_valid(run) is None


@pytest.mark.parametrize("moment", ["evaluate", "draw_figures"])
def test_signal_during_epoch_end_work_checkpoints_and_stops(
    moment: str, tiny_overrides: list[str], tmp_path: Path
) -> None:
    """SIGTERM during the epoch-end evaluation or pictures of epoch 1 (of 2): the run stops right after
    that work, with a checkpoint of the step it reached, and no further step."""
    trainer = Trainer(load_config(None, [*tiny_overrides, "checkpoint.every_epochs=0"]))
    owner = trainer.report if moment == "draw_figures" else trainer  # the figures are the report component's
    original = getattr(owner, moment)

    def interrupted(*args):
        signal.raise_signal(signal.SIGTERM)
        return original(*args)

    setattr(owner, moment, interrupted)
    summary = trainer.fit()
    assert summary["preempted"] and summary["steps"] == 8  # 400 examples / batch 50: the end of epoch 1
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step-00000008")
    assert verify(Path(summary["checkpoint"])) is None
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_signal_after_the_last_step_lets_the_run_finish(tiny_overrides: list[str], tmp_path: Path) -> None:
    """SIGTERM during the export: the final checkpoint is written already and the export takes
    milliseconds, so the run ends finished (exit 0 from vae-train), not preempted."""
    trainer = Trainer(load_config(None, tiny_overrides))
    export = trainer.checkpoints.export

    def interrupted():
        signal.raise_signal(signal.SIGTERM)
        return export()

    trainer.checkpoints.export = interrupted
    summary = trainer.fit()
    assert not summary.get("preempted") and summary["steps"] == 16
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert latest_valid(tmp_path / "run").name == "step-00000016"


def test_a_second_run_into_the_same_run_dir_is_refused(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd([*tiny_overrides, *LONG]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env()
    )
    try:
        wait_for(run / "metrics.jsonl", first)
        config = (run / "config.yaml").read_bytes()
        second = run_train([*tiny_overrides, "train.epochs=1"], timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run.dir={run} is in use by pid {first.pid} on host" in lines[0]
        assert f"kill -TERM {first.pid}" in lines[0] and "choose another run.dir" in lines[0]
        assert (run / "config.yaml").read_bytes() == config  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps))  # one run's lines only: no duplicated or reordered steps


def test_a_killed_run_leaves_no_lock_that_blocks_its_resume(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd([*tiny_overrides, *LONG, "checkpoint.every_steps=2"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cpu_env(),
    )
    wait_for(run / "checkpoints", first)
    time.sleep(0.5)
    first.kill()  # kill -9: no handler runs, the kernel drops the lock
    first.communicate()
    (run / "checkpoints" / ".tmp-step-00009999-1").mkdir()  # what a save killed mid-write leaves
    resumed = run_train([*tiny_overrides, "train.epochs=3"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))  # cleared at the start


def test_stale_temp_dirs_are_cleared_when_a_run_starts(tiny_overrides: list[str], tmp_path: Path) -> None:
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step-00000005-4242"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    trainer, _ = train_in_process([*tiny_overrides, "train.max_steps=2"])
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


ORPHAN = """
import os, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1]], env={**os.environ, "LOCAL_RANK": "0"},
    stdout=subprocess.PIPE, stderr=open(sys.argv[2], "w"), text=True,
)
child.stdout.readline()  # the child's handlers are installed (as a launcher's child starts training)
print(child.pid, flush=True)  # then this parent, the 'launcher', dies
"""
HUNG_CHILD = """
import time
import vae_dist.signals as signals
signals.ORPHAN_GRACE_S = 2.0
stop = signals.StopSignals().install()
stop.defer()  # the parent's death SIGTERM is only recorded: a loop that never looks again is 'hung'
print("ready", flush=True)
while True:
    time.sleep(0.5)
"""


def test_a_launcher_child_hung_past_its_signal_exits_after_the_grace(tmp_path: Path) -> None:
    """The launcher dies; its child gets SIGTERM (PR_SET_PDEATHSIG) but never acts on it: the parent
    watch ends it ORPHAN_GRACE_S later with its threads' tracebacks, so it never outlives the launcher."""
    err = tmp_path / "child.err"
    parent = subprocess.run(
        [sys.executable, "-c", ORPHAN, HUNG_CHILD, str(err)], capture_output=True, text=True, env=cpu_env(), timeout=60
    )
    child = int(parent.stdout.split()[0])
    deadline = time.time() + 30
    while time.time() < deadline:
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the orphaned child was still running 30 s after its launcher died")
    assert "Timeout" in err.read_text()  # faulthandler's dump: it was the deadline that ended it


def test_a_start_up_signal_masked_by_a_librarys_cleanup_still_exits_75(monkeypatch, capsys) -> None:
    """The signal's Stopped can surface as another error raised in a library's `finally` (seen:
    argparse's parse_intermixed_args, AttributeError 'save_nargs'); it is still a stop during start-up."""
    import vae_dist.cli.train as train
    from vae_dist.signals import Stopped

    def parse_interrupted(argv):
        try:
            raise Stopped(signal.SIGTERM)
        finally:
            raise AttributeError("'_StoreAction' object has no attribute 'save_nargs'")

    monkeypatch.setattr(train, "parse_args", parse_interrupted)
    assert train.main([]) == 75
    assert "stopped by SIGTERM during start-up" in capsys.readouterr().err
