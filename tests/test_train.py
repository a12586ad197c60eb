"""End-to-end training on tiny generated IDX files, single process on the CPU.
Run: pytest tests/test_train.py"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, train_in_process
from vae_dist.config import load_config
from vae_dist.metrics_file import MetricsFile
from vae_dist.model import VAE


def test_tiny_training_end_to_end(tiny_overrides: list[str], tmp_path: Path) -> None:
    trainer, summary = train_in_process(tiny_overrides)
    run = tmp_path / "run"
    records = MetricsFile(run / "metrics.jsonl").read()
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    # 400 examples / batch 50 = 8 steps per epoch, 2 epochs, logged every 2 steps.
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [(r["epoch"], r["step"]) for r in test] == [(1, 8), (2, 16)]
    for r in records:
        assert {"split", "epoch", "step", "elbo", "recon", "kl"} <= r.keys()
        assert math.isclose(r["elbo"], r["recon"] + r["kl"], rel_tol=1e-5)
    assert train[-1]["elbo"] < train[0]["elbo"]  # it learns
    assert summary["final_test_elbo"] == test[-1]["elbo"] and summary["steps"] == 16
    # Exported weights load without the trainer and equal the trained ones.
    model = VAE.from_pretrained(run)
    for a, b in zip(model.state_dict().values(), trainer.accelerator.unwrap_model(trainer.model).state_dict().values()):
        assert torch.equal(a, b)
    # The resolved config is saved and reloads to the same tree.
    assert load_config(run / "config.yaml").to_dict() == trainer.cfg.to_dict()


def test_max_steps_caps_training(tiny_overrides: list[str], tmp_path: Path) -> None:
    _, summary = train_in_process(tiny_overrides + ["train.max_steps=5", "train.epochs=10"])
    assert summary["steps"] == 5
    test = [r for r in MetricsFile(tmp_path / "run" / "metrics.jsonl").read() if r["split"] == "test"]
    assert [r["step"] for r in test] == [5]


def test_bf16_mixed_precision_trains(tiny_overrides: list[str]) -> None:
    _, summary = train_in_process(tiny_overrides + ["train.precision=bf16"])
    assert math.isfinite(summary["final_test_elbo"]) and summary["final_test_elbo"] < 600


def test_hot_path_uses_fused_adam_and_flushes_subnormals(tiny_overrides: list[str]) -> None:
    trainer, _ = train_in_process(tiny_overrides + ["train.max_steps=2"])
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert torch.tensor([1e-39]).item() == 0.0  # subnormal float32: flushed to zero on this thread


def test_flush_denormal_false_keeps_ieee_subnormals(tiny_overrides: list[str]) -> None:
    train_in_process(tiny_overrides + ["train.max_steps=2", "train.flush_denormal=false"])
    assert torch.tensor([1e-39]).item() > 0.0


def test_compiled_model_trains_like_eager(tiny_overrides: list[str], tmp_path: Path) -> None:
    """train.compile runs the same arithmetic through torch.compile (inductor's C++ kernels on CPU)."""
    _, eager = train_in_process(tiny_overrides + ["train.max_steps=4", f"run.dir={tmp_path / 'eager'}"])
    _, compiled = train_in_process(
        tiny_overrides + ["train.max_steps=4", "train.compile=true", f"run.dir={tmp_path / 'compiled'}"]
    )
    assert compiled["steps"] == 4
    assert math.isclose(compiled["final_test_elbo"], eager["final_test_elbo"], rel_tol=1e-4)


def test_train_examples_per_s_excludes_epoch_end_work(tiny_overrides: list[str], monkeypatch) -> None:
    """Evaluation, pictures and saving after an epoch do not count as training time."""
    from vae_dist.config import load_config
    from vae_dist.trainer import Trainer

    trainer = Trainer(load_config(None, tiny_overrides))
    clock = iter([1000.0, 1030.0])  # end_epoch starts at 1000 s and its work takes 30 s
    monkeypatch.setattr("vae_dist.trainer.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr("vae_dist.window.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr(trainer, "evaluate", lambda: {"elbo": 1.0, "recon": 0.5, "kl": 0.5, "loss": 1.0})
    monkeypatch.setattr(trainer.report, "draw_figures", lambda model, step: None)
    trainer.window.start = (900.0, 0)
    trainer.end_epoch()
    assert trainer.window.start == (930.0, 0)
    trainer.close()


def test_cli_runs_as_script_and_module(tiny_overrides: list[str], tmp_path: Path) -> None:
    for i, entry in enumerate([["-m", "vae_dist.train"], [str(REPO / "vae_dist" / "train.py")]]):
        run = tmp_path / f"cli{i}"
        proc = subprocess.run(
            [sys.executable, *entry, *tiny_overrides, f"run.dir={run}", "train.max_steps=3"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
        assert "test elbo" in proc.stdout


def test_missing_data_exits_2_with_advice(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vae_dist.cli.train",
            f"data.root={tmp_path / 'empty'}",
            "data.download=false",
            f"run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in proc.stderr and str(tmp_path / "empty" / "MNIST" / "raw") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_figures_drawn_by_a_background_worker_are_complete_at_the_end(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch
) -> None:
    """What a GPU run does (a worker process draws while training goes on), forced on the CPU."""
    import vae_dist.report as metrics_mod
    from vae_dist.figures import FigureDrawer

    class InTheBackground(FigureDrawer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "background": True})

    monkeypatch.setattr(metrics_mod, "FigureDrawer", InTheBackground)
    trainer, _ = train_in_process(tiny_overrides)
    for name in ("recon.png", "prior.png", "manifold.png", "latent.png", "loss.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert trainer.report.figures is None  # the worker was waited for and stopped


def test_what_a_run_says_about_where_and_how_far_it_trained(tiny_overrides: list[str], tmp_path: Path) -> None:
    """The device and processor once at the start and in the summary; `epoch` in every record counts
    completed epochs (the last step of an epoch completes it); a run stopped inside an epoch says so
    instead of "epoch 0"; a rerun of the finished run says it is finished and where its model is."""
    from conftest import run_train

    first = run_train([*tiny_overrides, "train.max_steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("training on cpu (") == 1 and "vae_dist run: device: cpu (" in first.stdout
    assert "step 3 (3 of epoch 1's 8 steps)  test elbo" in first.stdout and "epoch 0  test elbo" not in first.stdout
    done = run_train(tiny_overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    records = MetricsFile(tmp_path / "run" / "metrics.jsonl").read()
    assert [(r["epoch"], r["step"]) for r in records if r["split"] == "train" and r["step"] % 8 in (0, 6)] == [
        (0, 6),
        (1, 8),
        (1, 14),
        (2, 16),
    ]
    again = run_train(tiny_overrides)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = again.stdout.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'run'} holds a finished run (16 optimizer steps)" in lines[0]
    assert f"its model is {tmp_path / 'run' / 'model.safetensors'}" in lines[0]
