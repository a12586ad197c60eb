"""The optimizer step as one CUDA graph (issue 12), on a real GPU; skipped where torch sees none.
Run: pytest -m cuda tests/test_cuda.py   (part of `make gpu-check`)

Every run here is in-process on tiny generated MNIST-format files (10,000 training examples: 100
steps an epoch at batch 100), so the numbers compare like with like: graph against eager, resumed
against uninterrupted, accumulated against whole batches, all on the same device.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from conftest import load_weights, make_mnist
from conftest import train_in_process as fit
from vae_dist.step import GraphWarning

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("data"), n_train=10_000, n_test=1_000)


def overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data}",
        "data.download=false",
        f"run.dir={run}",
        "train.device=cuda",
        "train.epochs=1",
        "train.batch_size=100",
        "tracking.mode=off",
        "tracking.images_every_epochs=0",
        "tracking.log_every_steps=10",
        *extra,
    ]


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| / |b| over the tensors."""
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)


def test_graph_equals_eager_after_100_fp32_steps(gpu_data: Path, tmp_path: Path) -> None:
    graphed, _ = fit(overrides(gpu_data, tmp_path / "graph", "train.cuda_graphs=on"))
    assert graphed.step_fn.graph is not None and graphed.step == 100
    eager, _ = fit(overrides(gpu_data, tmp_path / "eager", "train.cuda_graphs=off"))
    assert eager.step_fn.graph is None
    assert relative(load_weights(tmp_path / "graph"), load_weights(tmp_path / "eager")) <= 1e-6


def test_resume_under_graphs_continues_exactly(gpu_data: Path, tmp_path: Path) -> None:
    args = ["train.cuda_graphs=on", "train.epochs=2"]
    fit(overrides(gpu_data, tmp_path / "ref", *args))
    _, summary = fit(overrides(gpu_data, tmp_path / "run", *args), stop_at=137)  # mid-epoch 2
    assert summary["preempted"] and summary["steps"] == 137
    resumed, summary = fit(overrides(gpu_data, tmp_path / "run", *args))
    assert summary["steps"] == 200 and resumed.step_fn.graph is not None
    assert relative(load_weights(tmp_path / "run"), load_weights(tmp_path / "ref")) <= 1e-6


def test_accumulation_under_graphs_equals_whole_batches(gpu_data: Path, tmp_path: Path) -> None:
    """1 x 100 and 1 x 50 x 2: one graph holds both micro-batches' forward and backward. 10 steps, as
    the CPU's invariance test: 50-row and 100-row products take other kernels, whose rounding Adam
    grows over hundreds of steps; accumulation gone wrong under a graph is off at the first step."""
    args = ["train.cuda_graphs=on", "train.max_steps=10"]
    whole, _ = fit(overrides(gpu_data, tmp_path / "whole", *args))
    accum, _ = fit(overrides(gpu_data, tmp_path / "accum", *args, "train.micro_batch_size=50"))
    assert accum.accum == 2 and accum.step_fn.graph is not None and whole.step_fn.graph is not None
    assert relative(load_weights(tmp_path / "accum"), load_weights(tmp_path / "whole")) <= 1e-5


@pytest.mark.parametrize("failure", ["blocked", "capture raises", "differs from eager"])
def test_a_failed_capture_warns_once_and_trains_on_eagerly(
    failure: str, gpu_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vae_dist.step as step_mod

    if failure == "blocked":
        monkeypatch.setattr(step_mod.TrainStep, "blocker", lambda self: "a test blocks it")
    elif failure == "capture raises":

        def broken_graph(*args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(step_mod.torch.cuda, "graph", broken_graph)
    else:
        monkeypatch.setattr(step_mod, "VERIFY_RTOL", -1.0)  # no difference is small enough
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, summary = fit(overrides(gpu_data, tmp_path / "run", "train.cuda_graphs=on"))
    graph_warnings = [w for w in caught if issubclass(w.category, GraphWarning)]
    assert len(graph_warnings) == 1, [str(w.message) for w in caught]
    expected = {
        "blocked": "a test blocks it",
        "capture raises": "capture failed (RuntimeError",
        "differs from eager": "differed from the eager step",
    }
    assert expected[failure] in str(graph_warnings[0].message)
    assert trainer.step_fn.graph is None and summary["steps"] == 100
    fit(overrides(gpu_data, tmp_path / "eager", "train.cuda_graphs=off"))
    assert relative(load_weights(tmp_path / "run"), load_weights(tmp_path / "eager")) <= 1e-6


def test_bf16_under_graphs_trains(gpu_data: Path, tmp_path: Path) -> None:
    trainer, summary = fit(
        overrides(gpu_data, tmp_path / "run", "train.cuda_graphs=on", "train.precision=bf16", "train.epochs=2")
    )
    assert trainer.step_fn.graph is not None
    records = [r for r in trainer.metrics.read() if r["split"] == "train"]
    assert math.isfinite(summary["final_test_elbo"]) and records[-1]["elbo"] < records[0]["elbo"]
