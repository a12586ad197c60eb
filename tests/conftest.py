"""Shared fixtures: tiny MNIST-format IDX files written by the tests themselves (no network, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vae_dist.data import write_idx  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def fake_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28x28 uint8 images: each label draws a bright bar at its own place, plus noise, so a VAE can learn them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 2 + 2 * y : 5 + 2 * y, 4:24] = 255
    return images, labels


def make_mnist(root: Path, n_train: int = 400, n_test: int = 150, folder: str = "MNIST") -> Path:
    raw = root / folder / "raw"
    write_idx(raw, "train", *fake_digits(n_train, 0))
    write_idx(raw, "t10k", *fake_digits(n_test, 1))
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data.root holding tiny MNIST IDX files: 400 train, 150 test examples."""
    return make_mnist(tmp_path / "data")


@pytest.fixture
def tiny_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long CPU run on the tiny data."""
    return [
        f"data.root={data_root}",
        "data.download=false",
        f"run.dir={tmp_path / 'run'}",
        "train.epochs=2",
        "train.batch_size=50",
        "train.eval_batch_size=64",
        "model.hidden_dims=[64, 32]",
        "tracking.mode=off",
        "tracking.log_every_steps=2",
        "train.device=cpu",  # these tests mean the CPU, also on a machine with a GPU
    ]


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Accelerate keeps process-wide singletons, and a Trainer (or the bench) sets torch's thread count
    and subnormal mode for the whole process: each in-process test starts from a clean slate."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def train_in_process(overrides: list[str], stop_at: int | None = None):
    """Build and fit a Trainer in this process; returns (trainer, summary). With `stop_at`, SIGUSR1
    is delivered to this process right after optimizer step `stop_at` (the run then checkpoints and
    stops). Accelerate's process-wide state is reset first, so several runs fit in one test."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from vae_dist.config import load_config
    from vae_dist.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer = Trainer(load_config(None, overrides))
    if stop_at is not None:
        after = trainer.after_optimizer_step

        def after_then_signal() -> None:
            after()
            if trainer.step == stop_at:
                signal.raise_signal(signal.SIGUSR1)

        trainer.after_optimizer_step = after_then_signal
    return trainer, trainer.fit()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `args` (a script path or -m module, then its arguments) in `nproc` processes:
    plain python for one, `accelerate launch --multi_gpu` (a real gloo group on the CPU) for more."""
    import sys

    if nproc == 1:
        return [sys.executable, *args]
    flags = ["--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no"]
    flags += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, *args]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that means the CPU: no GPU visible, also on a machine with GPUs."""
    import os

    # WANDB_SERVICE: an in-process test's wandb.setup() names this process's W&B service there; a
    # subprocess must start its own, as a user's command does.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def run_train(overrides: list[str], cwd: Path | None = None, timeout: float = 300):
    """`python -m vae_dist.cli.train OVERRIDES` on the CPU, to completion, its output captured."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vae_dist.cli.train", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=cpu_env(), timeout=timeout)


def launch(nproc: int, args: list[str], cwd: Path, timeout: float = 300, **kwargs):
    """Run launch_cmd(nproc, args) to completion on the CPU, capturing its output."""
    import subprocess

    kwargs.setdefault("env", cpu_env())
    return subprocess.run(launch_cmd(nproc, args), capture_output=True, text=True, cwd=cwd, timeout=timeout, **kwargs)


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(folder, bytes): a tmpfs of that size at `folder` (root only; skips where mounting is not
    permitted), unmounted after the test."""
    import os
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real full disk needs root to mount a small tmpfs; the simulated ENOSPC test covers it")
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs is not permitted here ({proc.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
