"""Config tree: YAML + overrides, strict checking. Run: pytest tests/test_config.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from vae_dist.config import Config, ConfigError, load_config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_mnist_yaml_is_the_reference_experiment() -> None:
    cfg = load_config(REPO / "configs" / "mnist.yaml")
    assert (cfg.model.z_dim, cfg.model.hidden_dims, cfg.optim.lr) == (2, [512, 256], 1e-3)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.data.binarize, cfg.model.objective) == (100, 40, "none", "elbo")
    assert cfg.optim.schedule == "constant" and cfg.train.precision == "no"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "optim.lr=2e-3",
            "model.hidden_dims=[64, 32]",
            "tracking.mode=off",
            "train.max_steps=null",
            "run.dir=2024",
            "optim.grad_clip=1",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.optim.lr == 2e-3 and cfg.model.hidden_dims == [64, 32]
    assert cfg.tracking.mode == "off" and cfg.train.max_steps is None and cfg.run.dir == "2024"
    assert isinstance(cfg.optim.grad_clip, float)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.epochs=-1", ["train.epochs=-1", ">= 1"]),
        ("model.z_dim=abc", ["model.z_dim='abc'", "an integer"]),
        ("optim.lrr=1", ["optim.lrr is not a config key", "lr"]),
        ("data.dataset=cifar", ["data.dataset='cifar'", "mnist, fashion_mnist, kmnist"]),
        ("train.precision=fp8", ["train.precision", "no, fp16, bf16"]),
        ("nosuch.key=1", ["nosuch is not a config section", "train"]),
        ("train.epochs", ["section.key=value"]),
        ("model.hidden_dims=[0]", ["model.hidden_dims", "integers >= 1"]),
        ("train.eval_batch_size=true", ["train.eval_batch_size=True", "an integer"]),
    ],
)
def test_bad_override_names_key_and_allowed(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_all_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=0", "optim.lr=-1"])
    assert "train.epochs=0" in str(err.value) and "optim.lr=-1" in str(err.value)


def test_accumulation_arithmetic() -> None:
    cfg = load_config(None, ["train.batch_size=100", "train.micro_batch_size=25"])
    assert cfg.train.accumulation_steps(2) == 2 and cfg.train.micro_batch(2) == 25
    assert load_config(None, ["train.batch_size=100"]).train.accumulation_steps(4) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["train.batch_size=100", "train.micro_batch_size=30"]).train.accumulation_steps(1)
    with pytest.raises(ConfigError, match="over 3 processes; use a multiple of 3 \\(e.g. 99 or 102\\)"):
        load_config(None, ["train.batch_size=100"]).train.accumulation_steps(3)


@pytest.mark.parametrize("override", ["train.epochs=-1", "model.z_dim=abc", "optim.lrr=1"])
def test_cli_bad_override_exits_with_one_line_and_writes_nothing(override: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vae_dist.train",
            "--config",
            str(REPO / "configs" / "mnist.yaml"),
            f"run.dir={run_dir}",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0]
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
