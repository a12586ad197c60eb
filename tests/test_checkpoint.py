"""Checkpoints: safetensors + JSON only, atomic, exact resume, clear errors.
Run: pytest tests/test_checkpoint.py   (the kill -9 loop is marked slow, the 2-process ones distributed)"""

from __future__ import annotations

import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae_dist.checkpoint_files as ckpt_mod
from conftest import launch, launch_cmd, load_weights, run_train, train_in_process
from vae_dist.checkpoint import CheckpointError, latest_valid, verify
from vae_dist.config import ConfigError, load_config
from vae_dist.model import VAE
from vae_dist.trainer import Trainer


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field, which no two runs share."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def ckpt_overrides(tiny_overrides: list[str]) -> list[str]:
    # 8 steps per epoch, 2 epochs; logs every 3 steps so a stop lands inside a logging window.
    return tiny_overrides + ["tracking.log_every_steps=3", "checkpoint.keep=3"]


def test_checkpoint_files_are_safetensors_and_json(ckpt_overrides: list[str], tmp_path: Path) -> None:
    train_in_process(ckpt_overrides)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000008", "step-00000016"]
    for path in ckpts:
        names = sorted(p.name for p in path.iterdir())
        assert names == [
            "config.json",
            "manifest.json",
            "model.safetensors",
            "optimizer.safetensors",
            "state.json",
            "trainer.safetensors",
        ]
        assert verify(path) is None
        state = json.loads((path / "state.json").read_text())
        assert {"step", "config", "versions", "components"} <= state.keys()
        # Each component's part under its own name (JSON), and its tensors as name.key, one row per rank.
        parts = state["components"]
        assert {"step", "epoch", "step_in_epoch"} <= parts["train"].keys() and "tracker_run_id" in parts["report"]
        assert load_file(str(path / "trainer.safetensors"))["rng.rng_cpu"].shape[0] == 1  # one rank
    # A checkpoint directory loads as a model with no trainer, like an export.
    assert VAE.from_pretrained(ckpts[-1]).z_dim == 2


@pytest.mark.parametrize("stop_at", [1, 5, 8, 13])
def test_stop_after_any_step_resumes_bit_exactly(ckpt_overrides: list[str], tmp_path: Path, stop_at: int) -> None:
    ref = tmp_path / "ref"
    train_in_process(ckpt_overrides + [f"run.dir={ref}"])
    run = tmp_path / "stopped"
    _, summary = train_in_process(ckpt_overrides + [f"run.dir={run}"], stop_at=stop_at)
    assert summary["preempted"] and summary["steps"] == stop_at
    assert (run / "checkpoints" / f"step-{stop_at:08d}").is_dir() and not (run / "model.safetensors").exists()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    _, summary = train_in_process(ckpt_overrides + [f"run.dir={run}"])  # train.resume=auto is the default
    assert summary["steps"] == 16
    assert_same_weights(load_weights(run), load_weights(ref))
    assert metrics(run) == metrics(ref)


def test_corrupt_newest_checkpoint_falls_back(ckpt_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in_process(ckpt_overrides + ["train.epochs=3"])
    newest = run / "checkpoints" / "step-00000024"
    blob = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000024.*model.safetensors has"):
        assert latest_valid(run) == run / "checkpoints" / "step-00000016"
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes, the manifest says"):
        Trainer(load_config(None, ckpt_overrides + [f"train.resume={newest}"]))
    # An interrupted save (no manifest yet) is never loaded either.
    (run / "checkpoints" / "step-00000016" / "manifest.json").unlink()
    with pytest.warns(UserWarning):
        assert latest_valid(run) == run / "checkpoints" / "step-00000008"


def test_other_architecture_names_tensors_and_shapes(ckpt_overrides: list[str], tmp_path: Path) -> None:
    train_in_process(ckpt_overrides + ["train.max_steps=2"])
    with pytest.raises(CheckpointError) as err:
        Trainer(load_config(None, ckpt_overrides + ["model.z_dim=3", "train.max_steps=4"]))
    assert "mu.weight: checkpoint (2, 32) vs model (3, 32)" in str(err.value)


def test_pickle_checkpoints_are_refused(ckpt_overrides: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="pickle.*never unpickles"):
        Trainer(load_config(None, ckpt_overrides + [f"train.resume={bad}"]))


def test_missing_resume_path_and_unwritable_run_dir(ckpt_overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Trainer(load_config(None, ckpt_overrides + [f"train.resume={tmp_path / 'nope'}"]))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be written"):
        Trainer(load_config(None, ckpt_overrides + [f"run.dir={blocker / 'run'}"]))


def test_resume_none_refuses_to_mix_with_existing_checkpoints(ckpt_overrides: list[str], tmp_path: Path) -> None:
    train_in_process(ckpt_overrides + ["train.max_steps=2"])
    with pytest.raises(ConfigError, match="train.resume=none but .* already holds checkpoints"):
        Trainer(load_config(None, ckpt_overrides + ["train.resume=none"]))


def test_disk_full_during_save_keeps_previous_checkpoint(
    ckpt_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train_in_process(ckpt_overrides + ["train.epochs=1"])
    real_save = ckpt_mod.save_file

    def save_then_fill_disk(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_then_fill_disk)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000008 is intact"):
        train_in_process(ckpt_overrides + ["train.epochs=2"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008"]  # no temp dir left
    assert verify(run / "checkpoints" / "step-00000008") is None


def reset_accelerate() -> None:
    """Accelerate's singletons must be fresh for each Trainer built in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_checkpoint_of_a_newer_format_is_refused_by_name(ckpt_overrides: list[str], tmp_path: Path) -> None:
    """A checkpoint a newer vae_dist wrote (a higher format in state.json, its manifest intact) is one
    sentence naming the formats, before any part of it whose layout may have changed is read."""
    run = tmp_path / "run"
    train_in_process(ckpt_overrides)
    newest = run / "checkpoints" / "step-00000016"
    state = json.loads((newest / "state.json").read_text())
    assert state["format"] == ckpt_mod.FORMAT
    del state["optimizer_param_groups"]  # a layout this release cannot read
    (newest / "state.json").write_text(json.dumps({**state, "format": ckpt_mod.FORMAT + 1}))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["state.json"] = {
        "size": (newest / "state.json").stat().st_size,
        "sha256": ckpt_mod._sha256(newest / "state.json"),
    }
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert verify(newest) is None
    reset_accelerate()
    with pytest.raises(CheckpointError) as err:
        Trainer(load_config(None, ckpt_overrides + [f"train.resume={newest}"]))
    assert f"{newest} was written by a newer vae_dist (checkpoint format {ckpt_mod.FORMAT + 1}" in str(err.value)
    assert "upgrade vae_dist" in str(err.value)


def write_torch_pickle(path: Path, fmt: str) -> None:
    """What torch.save writes: a zip archive (the default) or a raw pickle (the legacy format)."""
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=fmt == "zip")


def test_pickle_named_safetensors_is_refused_on_resume(ckpt_overrides: list[str], tmp_path: Path) -> None:
    """A torch.save file renamed *.safetensors is refused as a pickle, before its manifest is
    checked, on resume from a path; train.resume=auto skips that checkpoint for the previous one."""
    run = tmp_path / "run"
    train_in_process(ckpt_overrides)
    newest, older = run / "checkpoints" / "step-00000016", run / "checkpoints" / "step-00000008"
    for name, fmt in [
        ("model.safetensors", "zip"),
        ("optimizer.safetensors", "raw"),
        ("trainer.safetensors", "zip"),
        ("model.safetensors", "raw"),
    ]:
        original = (newest / name).read_bytes()
        write_torch_pickle(newest / name, fmt)
        reset_accelerate()
        with pytest.raises(
            CheckpointError, match=r"(zip archive|raw pickle) written by torch\.save.*never unpickles"
        ) as err:
            Trainer(load_config(None, ckpt_overrides + [f"train.resume={newest}"]))
        assert str(newest / name) in str(err.value) and "pickle" in str(err.value)
        assert "manifest" not in str(err.value)  # the pickle check comes first
        reset_accelerate()
        with pytest.warns(UserWarning, match=rf"skipping checkpoint .*step-00000016.*{name} .*pickle"):
            trainer = Trainer(load_config(None, ckpt_overrides + ["train.epochs=3"]))  # train.resume=auto
        assert trainer.step == 8 and verify(older) is None
        trainer.close()  # built, never fit: it would hold run.dir for as long as it lives
        (newest / name).write_bytes(original)
    assert verify(newest) is None


def test_real_full_disk_during_save(ckpt_overrides: list[str], tmp_path: Path, small_disk) -> None:
    """checkpoints/ on a tmpfs that holds one checkpoint and a half: the first save fits, the second
    runs out of space (safetensors raises SafetensorError, not OSError)."""
    params = sum(p.numel() for p in VAE(784, [64, 32], 2).parameters())  # the tiny_overrides model
    one_checkpoint = 12 * params  # fp32 weights + two Adam moments: ~1.3 MB
    checkpoints = small_disk(tmp_path / "run" / "checkpoints", one_checkpoint * 3 // 2)
    with pytest.raises(CheckpointError) as err:
        train_in_process(ckpt_overrides)
    message = str(err.value)
    assert "No space left on device" in message
    assert f"writing {checkpoints / 'step-00000016'}/" in message  # the file, as named in the checkpoint
    assert f"the previous checkpoint {checkpoints / 'step-00000008'} is intact" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000008"]  # no .tmp-* left
    assert verify(checkpoints / "step-00000008") is None


def test_a_full_disk_stops_vae_train_with_exit_1_and_one_sentence(
    ckpt_overrides: list[str], tmp_path: Path, small_disk
) -> None:
    """The same full disk, as a user meets it: the command, its exit code and its one line."""
    params = sum(p.numel() for p in VAE(784, [64, 32], 2).parameters())
    run = small_disk(tmp_path / "run", 12 * params * 3 // 2)  # the whole run.dir on the small disk
    proc = run_train(ckpt_overrides, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-train: error: could not write"), proc.stderr[-2000:]
    assert "No space left on device" in lines[0] and "step-00000008" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert verify(run / "checkpoints" / "step-00000008") is None


def test_safetensors_error_during_save_is_a_sentence(
    ckpt_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_file reports a full disk as SafetensorError ("... (os error 28)"); simulated here, so it
    runs on any machine."""
    from safetensors import SafetensorError

    run = tmp_path / "run"
    train_in_process(ckpt_overrides + ["train.epochs=1"])
    real_save = ckpt_mod.save_file

    def save_then_fill_disk(tensors, filename, metadata=None):
        if filename.endswith("trainer.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_then_fill_disk)
    reset_accelerate()
    with pytest.raises(CheckpointError) as err:
        train_in_process(ckpt_overrides + ["train.epochs=2"])
    final = run / "checkpoints" / "step-00000016"
    assert f"could not write checkpoint {final}: writing {final / 'trainer.safetensors'} failed" in str(err.value)
    assert "No space left on device (os error 28)" in str(err.value)
    assert f"previous checkpoint {run / 'checkpoints' / 'step-00000008'} is intact" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008"]


def test_clear_stale_temps_removes_only_temp_dirs(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    crashed = root / ".tmp-step-00000008-4242"
    crashed.mkdir(parents=True)
    (crashed / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step-00000016-4243").mkdir()
    kept = [root / "step-00000004", root / ".tmp-note", root / ".tmp-link", root / "tmp-step-1", tmp_path / "outside"]
    kept[0].mkdir()
    kept[1].write_text("a file, not a save")
    kept[4].mkdir()
    (kept[4] / "data").write_text("keep")
    kept[2].symlink_to(kept[4], target_is_directory=True)
    kept[3].mkdir()
    removed = ckpt_mod.clear_stale_temps(tmp_path / "run")
    assert removed == [crashed, root / ".tmp-step-00000016-4243"]
    assert not crashed.exists() and all(p.exists() for p in kept) and (kept[4] / "data").exists()
    assert ckpt_mod.clear_stale_temps(tmp_path / "run") == [] == ckpt_mod.clear_stale_temps(tmp_path / "none")


def test_nonfinite_loss_stops_with_the_step_and_term(ckpt_overrides: list[str], tmp_path: Path) -> None:
    # lr 1e6 diverges within a few steps; the error names the step and the term, nothing diverged is saved.
    from vae_dist.window import NonFiniteLossError

    with pytest.raises(
        NonFiniteLossError,
        match=r"not finite for 3 consecutive optimizer steps, up to step \d+ "
        r"\(non-finite term: .*\)",
    ):
        train_in_process(ckpt_overrides + ["optim.lr=1e6", "tracking.log_every_steps=1"])
    for path in (tmp_path / "run" / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "model.safetensors")).values())


def test_sigterm_exit_code_and_message(ckpt_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_dist.cli.train", *ckpt_overrides, "train.epochs=400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "received SIGTERM" in out and "rerun the same command to resume" in out
    assert latest_valid(run) is not None


@pytest.mark.distributed
def test_two_process_resume_is_bit_exact(ckpt_overrides: list[str], tmp_path: Path) -> None:
    base = [*ckpt_overrides, "train.batch_size=50"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    for args in ([f"run.dir={ref}"], [f"run.dir={run}", "train.max_steps=5"], [f"run.dir={run}"]):
        proc = launch(2, ["-m", "vae_dist.cli.train", *base, *args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_same_weights(load_weights(run), load_weights(ref))
    # The max_steps=5 stop evaluated the test split at step 5 (a finished run always does); apart from
    # that record the resumed run logged exactly what the uninterrupted one did.
    assert [r for r in metrics(run) if (r["split"], r["step"]) != ("test", 5)] == metrics(ref)
    rng = load_file(str(run / "checkpoints" / "step-00000016" / "trainer.safetensors"))["rng.rng_cpu"]
    assert rng.shape[0] == 2  # each rank's RNG state


@pytest.mark.distributed
def test_sigusr1_to_one_rank_stops_both(ckpt_overrides: list[str], tmp_path: Path) -> None:
    import psutil

    run = tmp_path / "run"
    cmd = launch_cmd(2, ["-m", "vae_dist.cli.train", *ckpt_overrides, "train.epochs=400", "train.batch_size=50"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    ranks = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "vae_dist.cli.train" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGUSR1)  # one rank only: the other must agree through the collective flag
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # accelerate launch reports a child's exit code 75 as a failure (1)
    assert "stopped by a signal at step" in out  # printed by rank 0, which never got the signal itself
    saved = latest_valid(run)
    assert saved is not None and json.loads((saved / "state.json").read_text())["step"] > 0
    assert not (run / "model.safetensors").exists()  # stopped, not finished


@pytest.mark.slow
def test_kill_minus_9_at_random_moments(ckpt_overrides: list[str], tmp_path: Path) -> None:
    """Twenty kill -9 at random moments (saves and metrics.jsonl writes included: a checkpoint every
    step, a record every step), each followed by train.resume=auto, end with the uninterrupted run's
    parameters and records (no step missing, none twice); every 'resumed from' names a checkpoint."""
    base = [
        *ckpt_overrides,
        "train.epochs=6",
        "checkpoint.every_steps=1",
        "tracking.log_every_steps=1",
        "model.hidden_dims=[512, 256]",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.train", *base, f"run.dir={ref}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rng = random.Random(0)
    kills = 0
    while kills < 20:
        p = subprocess.Popen(
            [sys.executable, "-m", "vae_dist.cli.train", *base, f"run.dir={run}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        while not (run / "checkpoints").exists() and p.poll() is None:
            time.sleep(0.05)  # wait for training to start, then kill at a random moment
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is None:
            p.kill()
            kills += 1
        out, _ = p.communicate()
        for line in out.splitlines():
            if "resumed from" in line:
                resumed = Path(line.split("resumed from ")[1].split(" at step")[0])
                assert resumed.name.startswith("step-")
        if p.returncode == 0:
            break
    assert kills >= 1
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.train", *base, f"run.dir={run}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(load_weights(run), load_weights(ref))
    assert metrics(run) == metrics(ref)


def test_a_torn_last_metrics_line_is_dropped_on_resume(ckpt_overrides: list[str], tmp_path: Path) -> None:
    """A process killed while writing metrics.jsonl (kill -9, a full disk, a power cut) leaves a partial
    last line: the resume drops it with one warning line and goes on; nothing else in the file is lost."""
    run = tmp_path / "run"
    train_in_process(ckpt_overrides, stop_at=5)
    kept = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(kept + '{"split": "train", "epoch": 0, "step": 6, "loss": 51')
    proc = run_train(ckpt_overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torn = [line for line in proc.stderr.splitlines() if "torn" in line]
    assert len(torn) == 1 and f"{run / 'metrics.jsonl'}: dropped its last line" in torn[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # all JSON now
    assert records[: len(kept.splitlines())] == [json.loads(line) for line in kept.splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6, 9, 12, 15]


def test_a_damaged_metrics_line_is_one_sentence_with_exit_2(ckpt_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_in_process(ckpt_overrides, stop_at=7)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the train records of steps 3 and 6
    damaged = "\n".join([lines[0][:20], *lines[1:]]) + "\n"  # line 1 cut short, the rest intact
    (run / "metrics.jsonl").write_text(damaged)
    proc = run_train(ckpt_overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vae-train: error:")]
    assert len(errors) == 1 and f"{run / 'metrics.jsonl'} line 1 is not JSON" in errors[0]
    assert "delete that line" in errors[0]
    assert (run / "metrics.jsonl").read_text() == damaged  # nothing was touched


def test_a_resume_with_another_global_batch_is_refused(ckpt_overrides: list[str], tmp_path: Path) -> None:
    """Another train.batch_size would give the rest of the epoch other examples than the batch plan
    gave the steps already taken; another process count with the same global batch is fine."""
    train_in_process(ckpt_overrides, stop_at=3)
    with pytest.raises(ConfigError) as err:
        Trainer(load_config(None, [*ckpt_overrides, "train.batch_size=25"]))
    message = str(err.value)
    assert "train.batch_size=50 (the global batch)" in message and "asks for train.batch_size=25" in message
    assert "Resume with train.batch_size=50, or train with the new batch size in a new run.dir" in message


FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_format2" / "step-00000020"


def test_checkpoint_from_before_the_components_resumes_exactly(tmp_path: Path) -> None:
    """A checkpoint written by the trainer before it was split into components (tests/fixtures, see its
    README) resumes to step 40 with the weights of an uninterrupted 40-step run of today's code. Bit-exact
    where this machine computes the fixture's first 20 steps bit for bit (Intel Xeon with AVX-512, as it
    was written); elsewhere the CPU's own rounding of those steps is the only difference allowed."""
    from conftest import make_mnist

    root = make_mnist(tmp_path / "data", n_train=4000, n_test=150)
    base = [
        "--config",
        "configs/smoke.yaml",
        f"data.root={root}",
        "data.download=false",
        "model.hidden_dims=[32, 16]",
        "tracking.log_every_steps=8",
        "train.device=cpu",
    ]
    repo = Path(__file__).resolve().parent.parent
    for name, extra in (
        ("ref", ["train.max_steps=40"]),
        ("resumed", ["train.max_steps=40", f"train.resume={FIXTURE}"]),
    ):
        proc = run_train([*base, f"run.dir={tmp_path / name}", *extra], cwd=repo)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {FIXTURE} at step 20 (epoch 0, step 20)" in proc.stdout
    ref, resumed = load_weights(tmp_path / "ref"), load_weights(tmp_path / "resumed")
    at_20 = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000040" / "model.safetensors"))  # keys only
    same_cpu = all(
        torch.equal(a, b)
        for a, b in zip(
            load_file(str(FIXTURE / "model.safetensors")).values(), _weights_at(tmp_path, base, repo, 20).values()
        )
    )
    assert at_20.keys() == ref.keys()
    if same_cpu:
        assert_same_weights(resumed, ref)
    else:
        for key in ref:
            torch.testing.assert_close(resumed[key], ref[key], rtol=1e-3, atol=1e-5)
    # The resumed run's window continued the fixture's: its first train record covers steps 17-24.
    first = next(r for r in metrics(tmp_path / "resumed") if r["split"] == "train")
    ref_24 = next(r for r in metrics(tmp_path / "ref") if r["split"] == "train" and r["step"] == 24)
    assert first["step"] == 24 and (first == ref_24 or not same_cpu)


def _weights_at(tmp_path: Path, base: list[str], repo: Path, steps: int) -> dict[str, torch.Tensor]:
    """Today's code's weights after `steps` steps of the fixture's run."""
    proc = run_train([*base, f"run.dir={tmp_path / f'at{steps}'}", f"train.max_steps={steps}"], cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_weights(tmp_path / f"at{steps}")
