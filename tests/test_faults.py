"""The fault matrix: every file a run reads or writes on resume, damaged in every way a disk, a crash
or a person damages files, then the same command run again. Each case ends in one of two outcomes:

- the run resumes, and its final parameters and its records (no step missing, none twice) equal an
  uninterrupted run's; or
- it refuses with exit 2 and one sentence naming the file, no traceback, and every file on disk as
  it was (but `.lock`, which every start rewrites with who holds the run).

Never a third. The cases are generated (files x damages), CPU, in this process (vae_dist.cli.train.main).
Run: pytest tests/test_faults.py"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import load_weights, train_in_process

STOP_AT = 11  # the stopped run: checkpoints step-8 (epoch 1) and step-11 (the stop), records to step 9
NEWEST = f"checkpoints/step-{STOP_AT:08d}"
CHECKPOINT_FILES = [
    "model.safetensors",
    "config.json",
    "optimizer.safetensors",
    "trainer.safetensors",
    "state.json",
    "manifest.json",
]
FILES = [
    "config.yaml",
    "metrics.jsonl",
    ".lock",
    "eval.json",
    *(f"{NEWEST}/{name}" for name in CHECKPOINT_FILES),
    *(f"checkpoints/step-00000008/{name}" for name in ("model.safetensors", "manifest.json")),
]
DAMAGES = [
    "deleted",
    "empty",
    "truncated",
    "nul_tail",
    "random_middle",
    "no_final_newline",
    "unreadable",
    "folder",
]
ALL_CHECKPOINTS = "every checkpoint"  # a file name for the case that damages each checkpoint's model


def damage(path: Path, how: str, rng: random.Random) -> bool:
    """Damage `path` as `how` says; False when that damage changes nothing for this file (skip)."""
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        if len(data) < 2:
            return False
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif how == "nul_tail":  # what a crash leaves where the size reached the disk and the data did not
        tail = max(1, min(len(data) // 3, 512))
        path.write_bytes(data[:-tail] + b"\0" * tail)
    elif how == "random_middle":
        if len(data) < 8:
            return False
        start = rng.randrange(len(data) // 4, len(data) // 2)
        span = bytes(rng.randrange(256) for _ in range(min(16, len(data) - start)))
        if data[start : start + len(span)] == span:
            return False
        path.write_bytes(data[:start] + span + data[start + len(span) :])
    elif how == "no_final_newline":
        if not data.endswith(b"\n"):
            return False
        path.write_bytes(data.rstrip(b"\n"))
    elif how == "unreadable":
        path.chmod(0)
    elif how == "folder":
        path.unlink()
        path.mkdir()
        (path / "stray").write_text("a folder where a file should be\n")
    return True


def snapshot(run: Path) -> dict[str, bytes | str]:
    """Every file under `run` (but the lock) with its bytes; folders and unreadable files by kind."""
    files: dict[str, bytes | str] = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if rel == ".lock":
            continue
        if p.is_dir():
            files[rel] = "folder"
        elif not os.access(p, os.R_OK) or not stat.S_IMODE(p.stat().st_mode) & 0o444:
            files[rel] = f"mode {stat.S_IMODE(p.stat().st_mode):o}"
        else:
            files[rel] = p.read_bytes()
    return files


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


def train_main(overrides: list[str]) -> int:
    """vae-train in this process, on a fresh Accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    from vae_dist.cli.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main(overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny data, the uninterrupted run, and a run stopped at step STOP_AT with an eval.json."""
    from conftest import make_mnist

    base = tmp_path_factory.mktemp("faults")
    data = make_mnist(base / "data")
    overrides = [
        f"data.root={data}",
        "data.download=false",
        "train.epochs=2",
        "train.batch_size=50",
        "train.eval_batch_size=64",
        "model.hidden_dims=[64, 32]",
        "tracking.mode=off",
        "tracking.log_every_steps=3",
        "checkpoint.keep=3",
        "train.device=cpu",
    ]
    ref = base / "ref"
    train_in_process([*overrides, f"run.dir={ref}"])
    stopped = base / "stopped"
    train_in_process([*overrides, f"run.dir={stopped}"], stop_at=STOP_AT)
    # What vae-evaluate leaves in a run.dir; resuming must never need it, nor lose it.
    (stopped / "eval.json").write_text(json.dumps({"k": 10, "nll": 500.0, "elbo": 510.0}, indent=1) + "\n")
    return {"base": base, "overrides": overrides, "ref": ref, "stopped": stopped}


CASES = [(f, d) for f in FILES for d in DAMAGES] + [(ALL_CHECKPOINTS, "truncated")]


@pytest.mark.parametrize(("file", "how"), CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_a_damaged_file_resumes_exactly_or_is_refused_untouched(
    runs: dict, file: str, how: str, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    run = runs["base"] / "case"  # one path for every case: the files name their run.dir
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(runs["stopped"], run)
    rng = random.Random(f"{file}-{how}")
    targets = [run / "checkpoints" / c / "model.safetensors" for c in ("step-00000008", NEWEST.split("/")[1])]
    if file != ALL_CHECKPOINTS:
        targets = [run / file]
    for target in targets:
        if not damage(target, how, rng):
            pytest.skip(f"{how} leaves {file} as it was")
    before = snapshot(run)
    capfd.readouterr()
    try:
        code = train_main([*runs["overrides"], f"run.dir={run}"])
        after = snapshot(run)
    finally:
        for p in run.rglob("*"):  # pytest must be able to remove what an unreadable case left
            p.chmod(0o755 if p.is_dir() else 0o644)
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err[-3000:]
    if file == ALL_CHECKPOINTS:  # starting over would reproduce the numbers here, but never the hours of a real run
        assert code == 2, f"exit {code}: every checkpoint is damaged, and the run must not start over on top of them"
    if code == 0:
        ref = runs["ref"]
        weights, expected = load_weights(run), load_weights(ref)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in weights), "final parameters differ"
        assert records(run) == records(ref)
    else:
        assert code == 2, f"exit {code}: {err[-3000:]}"
        errors = [line for line in err.splitlines() if line.startswith("vae-train: error:")]
        assert len(errors) == 1, err[-3000:]
        named = file if file != ALL_CHECKPOINTS else "model.safetensors"
        assert Path(named).name in errors[0], errors[0]
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"a refused run changed {changed}"


def test_a_damaged_newest_checkpoint_never_costs_a_valid_one(runs: dict, tmp_path: Path) -> None:
    """keep=1, the newest checkpoint damaged: the run resumes from the one before it and trains on, and
    while the damaged one is there no valid checkpoint is removed to make room (it would count as
    'newest' and leave a run whose only whole checkpoints were deleted)."""
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    newest = run / NEWEST / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    damaged = newest.read_bytes()
    with pytest.warns(UserWarning, match="checkpoint.keep removes nothing while .* holds damaged checkpoints"):
        code = train_main([*runs["overrides"], f"run.dir={run}", "checkpoint.keep=1", "checkpoint.every_steps=2"])
    assert code == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [
        "step-00000008",
        "step-00000010",
        "step-00000011",
        "step-00000012",
        "step-00000014",
        "step-00000016",
    ]
    assert newest.read_bytes() == damaged  # left for the user to look at
    assert records(run) == records(runs["ref"])


def test_records_a_checkpoint_covers_are_on_disk_before_it(runs: dict, tmp_path: Path) -> None:
    """A checkpoint is written only after the records it covers are fsynced: a machine that crashes
    after the checkpoint cannot take them back. Here: every fsync of metrics.jsonl, in order with the saves."""
    import vae_dist.checkpoint_writer as checkpoint
    from vae_dist.metrics_file import MetricsFile

    events: list[str] = []
    sync, write = MetricsFile.sync, checkpoint.write_checkpoint

    def logged_sync(self):
        events.append(f"sync {len(self.read())}")
        return sync(self)

    def logged_write(run_dir, step, **kw):
        events.append(f"save {step}")
        return write(run_dir, step, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(MetricsFile, "sync", logged_sync)
    mp.setattr(checkpoint, "write_checkpoint", logged_write)
    try:
        train_in_process([*runs["overrides"], f"run.dir={tmp_path / 'run'}"])
    finally:
        mp.undo()
    # epoch 1 ends at step 8 with train records 3, 6 and its test record; the end adds 9, 12, 15 and a test
    assert [e for e in events if e.startswith("save")] == ["save 8", "save 16"]
    assert events[events.index("save 8") - 1] == "sync 3" and events[events.index("save 16") - 1] == "sync 7"


def test_a_torn_epoch_record_the_checkpoint_covers_is_refused_with_what_to_do(
    runs: dict, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """The test record of epoch 1 (the last line) torn after its checkpoint: a resume from step 8 would
    never log it again, so the run is refused; the sentence names the file and the ways on."""
    run = tmp_path / "run"
    overrides = [*runs["overrides"], f"run.dir={run}"]
    train_in_process([*overrides, "train.epochs=1"])  # then train.epochs=2 trains on from step 8
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["split"] == "test"
    torn = "\n".join(lines[:-1] + [lines[-1][:25]])
    (run / "metrics.jsonl").write_text(torn)
    capfd.readouterr()
    code = train_main(overrides)
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("vae-train: error:")]
    assert code == 2 and len(errors) == 1
    assert f"{run / 'metrics.jsonl'} lacks records that the checkpoint of step 8 covers" in errors[0]
    assert "the test record of epoch 1 is missing" in errors[0] and "Restore the file from a copy" in errors[0]
    assert (run / "metrics.jsonl").read_text() == torn


def test_a_rerun_with_nothing_to_train_says_so_instead_of_a_throughput(
    runs: dict, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A run killed between its final checkpoint and its export: the rerun only evaluates and exports."""
    run = tmp_path / "run"
    shutil.copytree(runs["ref"], run)
    (run / "model.safetensors").unlink()
    capfd.readouterr()
    assert train_main([*runs["overrides"], f"run.dir={run}"]) == 0
    out = capfd.readouterr().out
    assert "throughput: none: no optimizer step ran in this process" in out
    assert "0 examples/s" not in out


def test_a_stop_after_an_epochs_evaluation_logs_its_test_record_once(runs: dict, tmp_path: Path) -> None:
    """The checkpoint of an epoch's last step is taken before that epoch's evaluation (checkpoint.every_steps);
    a run stopped after the evaluation resumes from it and evaluates again: the test record it wrote
    before the stop is replaced, not doubled. (Found by the kill -9 loop comparing records.)"""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from vae_dist.config import load_config
    from vae_dist.trainer import Trainer

    overrides = [
        *runs["overrides"],
        f"run.dir={tmp_path / 'run'}",
        "checkpoint.every_steps=8",
        "checkpoint.every_epochs=0",
    ]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer = Trainer(load_config(None, overrides))
    evaluate = trainer.evaluate

    def evaluate_then_stop():
        result = evaluate()
        signal.raise_signal(signal.SIGTERM)  # lands while the epoch-end work runs: the run stops after it
        return result

    trainer.evaluate = evaluate_then_stop
    summary = trainer.fit()
    assert summary["preempted"] and summary["steps"] == 8
    assert [r["split"] for r in records(tmp_path / "run")][-1] == "test"
    assert train_main(overrides) == 0
    assert records(tmp_path / "run") == records(runs["ref"])
