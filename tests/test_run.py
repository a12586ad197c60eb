"""The one end of a run, observed on a real trainer on every path, and the ranks' agreement on a stop.
Run: pytest tests/test_run.py   (these tests mean the CPU; the graph's release on a GPU: tests/test_cuda.py)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import REPO, launch
from vae_dist.checkpoint import CheckpointError, CheckpointWriter, verify
from vae_dist.config import load_config
from vae_dist.report import Report
from vae_dist.run import STOP_CHECK_EVERY, Run
from vae_dist.runlock import RunLock
from vae_dist.step import TrainStep
from vae_dist.trainer import Trainer

# The order vae_dist.run documents: device work, the captured step, the checkpoint writer, the figure
# worker, the tracker, the process group, then run.dir's lock.
ORDER = ["synchronize", "release_graph", "checkpoint writer", "figures", "tracker", "process group", "lock"]


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The release stages of every Trainer built in the test, in the order they ran (each still runs).
    Only this test's run.dir lock counts: a RunLock that an earlier test dropped unreleased releases
    itself whenever the garbage collector gets to it (RunLock.__del__)."""
    seen: list[str] = []

    def record(owner, method: str, name: str) -> None:
        original = getattr(owner, method)

        def wrapper(self, *args, **kwargs):
            if not isinstance(self, RunLock) or Path(self.run_dir) == tmp_path / "run":
                seen.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, method, wrapper)

    record(Run, "synchronize", "synchronize")
    record(TrainStep, "release_graph", "release_graph")
    record(CheckpointWriter, "close", "checkpoint writer")
    record(Report, "close_figures", "figures")
    record(Report, "close_tracker", "tracker")
    record(Run, "destroy_process_group", "process group")
    record(RunLock, "release", "lock")
    return seen


def test_a_finished_run_ends_in_order(tiny_overrides: list[str], releases: list[str], tmp_path: Path) -> None:
    summary = Trainer(load_config(None, tiny_overrides)).fit()
    assert summary["steps"] == 16 and releases == ORDER
    # What the end released is free: the next run takes run.dir at once (and finds the run finished).
    assert Trainer(load_config(None, [*tiny_overrides, "train.epochs=2"])).fit() == {
        "finished_already": True,
        "steps": 16,
    }


def test_a_preempted_run_ends_in_order(tiny_overrides: list[str], releases: list[str], tmp_path: Path) -> None:
    trainer = Trainer(load_config(None, tiny_overrides))
    after = trainer.after_optimizer_step

    def after_then_signal() -> None:
        after()
        if trainer.step == 3:
            signal.raise_signal(signal.SIGUSR1)

    trainer.after_optimizer_step = after_then_signal
    summary = trainer.fit()
    assert summary["preempted"] and summary["steps"] == 3
    assert verify(Path(summary["checkpoint"])) is None  # written before the writer was closed
    assert releases == ORDER


def test_a_failed_run_ends_in_order(tiny_overrides: list[str], releases: list[str], tmp_path: Path) -> None:
    trainer = Trainer(load_config(None, [*tiny_overrides, "checkpoint.every_steps=2"]))

    def broken():
        raise RuntimeError("evaluation broke")

    trainer.evaluate = broken
    with pytest.raises(RuntimeError, match="evaluation broke"):
        trainer.fit()
    assert releases == ORDER
    assert verify(tmp_path / "run" / "checkpoints" / "step-00000008") is None  # the save in flight finished


def test_a_run_refused_at_start_up_ends_in_order(
    tiny_overrides: list[str], releases: list[str], tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Trainer(load_config(None, [*tiny_overrides, f"train.resume={tmp_path / 'nope'}"]))
    assert releases == ORDER
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty run.dir behind


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_both_within_the_documented_steps(tiny_overrides: list[str], tmp_path: Path) -> None:
    """SIGTERM to the last of 2 gloo processes after step 3 of a 40-step epoch: both ranks stop at the
    same step, at most 2 * STOP_CHECK_EVERY steps later, with a checkpoint of it (no epoch end between)."""
    signal_at = 3
    overrides = [*tiny_overrides, "train.batch_size=10", "train.epochs=3"]
    proc = launch(
        2, [str(REPO / "tests" / "dist_probe.py"), str(tmp_path / "out"), f"stop:{signal_at}", *overrides], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["summary"] for r in range(2)]
    assert ranks[0] == ranks[1]
    stopped = ranks[0]["steps"]
    assert ranks[0]["preempted"] and signal_at < stopped <= signal_at + 2 * STOP_CHECK_EVERY
    assert verify(Path(ranks[0]["checkpoint"])) is None and ranks[0]["checkpoint"].endswith(f"step-{stopped:08d}")
    assert "stopped by a signal at step" in proc.stdout  # rank 0 never got the signal itself


HANGS_AT_THE_END = """
import sys, time
import vae_dist.run as run_mod
from vae_dist.config import load_config
from vae_dist.trainer import Trainer

run_mod.END_GRACE_S = 3.0
trainer = Trainer(load_config(None, sys.argv[1:]))
trainer.report.close_tracker = lambda: time.sleep(120)  # a tracker that never finishes
trainer.fit()
"""


def test_a_release_that_hangs_ends_the_process_after_the_grace(tiny_overrides: list[str], tmp_path: Path) -> None:
    """The run's work is on disk; its end hangs in a release: after END_GRACE_S the process prints its
    threads' tracebacks and exits 1 instead of waiting for a scheduler's kill."""
    import subprocess
    import sys
    import time

    from conftest import cpu_env

    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANGS_AT_THE_END, *tiny_overrides],
        capture_output=True,
        text=True,
        env=cpu_env(),
        timeout=110,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert time.monotonic() - started < 100  # not the tracker's 120 s
    assert "Timeout" in proc.stderr and "<lambda>" in proc.stderr  # the traceback names where it hung
    assert (tmp_path / "run" / "model.safetensors").is_file()
