"""The optimizer step as one CUDA graph, on a real GPU; skipped where torch sees none.
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


GRAPHED = "one CUDA graph a step"  # the summary's "step" of a run whose steps replayed a graph


def test_graph_equals_eager_after_100_fp32_steps(gpu_data: Path, tmp_path: Path) -> None:
    graphed, summary = fit(overrides(gpu_data, tmp_path / "graph", "train.cuda_graphs=on"))
    assert summary["step"] == GRAPHED and graphed.step == 100
    eager, summary = fit(overrides(gpu_data, tmp_path / "eager", "train.cuda_graphs=off"))
    assert summary["step"] == "eager"
    assert relative(load_weights(tmp_path / "graph"), load_weights(tmp_path / "eager")) <= 1e-6


RECIPES = {
    # DReG on the IWAE bound: its weights fill a buffer after the forward, read by the backward
    "dreg": ["model.objective=iwae", "model.k=5", "model.estimator=dreg"],
    # STL with the paper's network and its output bias from the data
    "stl": ["model.estimator=stl", "model.activation=tanh", "model.init_output_bias=true"],
    # the KL weight, a device tensor filled before each replay, changing at every step up to 60
    "warmup": ["model.kl_warmup_steps=60"],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_features_under_graphs_equal_eager(gpu_data: Path, tmp_path: Path, recipe: str) -> None:
    graphed, summary = fit(overrides(gpu_data, tmp_path / "graph", "train.cuda_graphs=on", *RECIPES[recipe]))
    assert summary["step"] == GRAPHED and graphed.step == 100
    fit(overrides(gpu_data, tmp_path / "eager", "train.cuda_graphs=off", *RECIPES[recipe]))
    assert relative(load_weights(tmp_path / "graph"), load_weights(tmp_path / "eager")) <= 1e-6


def test_kl_warmup_under_graphs_resumes_exactly(gpu_data: Path, tmp_path: Path) -> None:
    args = ["train.cuda_graphs=on", "train.epochs=2", "model.kl_warmup_steps=150", *RECIPES["dreg"]]
    fit(overrides(gpu_data, tmp_path / "ref", *args))
    _, summary = fit(overrides(gpu_data, tmp_path / "run", *args), stop_at=77)  # mid warm-up
    assert summary["preempted"] and summary["steps"] == 77
    _, summary = fit(overrides(gpu_data, tmp_path / "run", *args))
    assert summary["steps"] == 200 and summary["step"] == GRAPHED
    assert relative(load_weights(tmp_path / "run"), load_weights(tmp_path / "ref")) <= 1e-6


def test_resume_under_graphs_continues_exactly(gpu_data: Path, tmp_path: Path) -> None:
    args = ["train.cuda_graphs=on", "train.epochs=2"]
    fit(overrides(gpu_data, tmp_path / "ref", *args))
    _, summary = fit(overrides(gpu_data, tmp_path / "run", *args), stop_at=137)  # mid-epoch 2
    assert summary["preempted"] and summary["steps"] == 137
    resumed, summary = fit(overrides(gpu_data, tmp_path / "run", *args))
    assert summary["steps"] == 200 and summary["step"] == GRAPHED
    assert relative(load_weights(tmp_path / "run"), load_weights(tmp_path / "ref")) <= 1e-6


def test_accumulation_under_graphs_equals_whole_batches(gpu_data: Path, tmp_path: Path) -> None:
    """1 x 100 and 1 x 50 x 2: one graph holds both micro-batches' forward and backward. 10 steps, as
    the CPU's invariance test: 50-row and 100-row products take other kernels, whose rounding Adam
    grows over hundreds of steps; accumulation gone wrong under a graph is off at the first step."""
    args = ["train.cuda_graphs=on", "train.max_steps=10"]
    _, whole = fit(overrides(gpu_data, tmp_path / "whole", *args))
    accum, summary = fit(overrides(gpu_data, tmp_path / "accum", *args, "train.micro_batch_size=50"))
    assert accum.accum == 2 and summary["step"] == GRAPHED and whole["step"] == GRAPHED
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
    assert summary["step"] == "one CUDA graph a step"
    assert trainer.step_fn.graph is None  # released at the end of the run, before the process group
    records = [r for r in trainer.report.file.read() if r["split"] == "train"]
    assert math.isfinite(summary["final_test_elbo"]) and records[-1]["elbo"] < records[0]["elbo"]


def test_a_host_sync_inside_the_capture_trains_on_with_the_numbers_of_eager(
    gpu_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside `torch.cuda.graph(...)` (here a host sync, which a capture cannot hold) leaves
    the noise generator marked as capturing and the capture stream current; the fallback undoes both,
    and the run ends with exactly the weights of train.cuda_graphs=off."""
    import vae_dist.step as step_mod

    original = step_mod.loss_terms

    def syncing(*args, **kwargs):
        terms = original(*args, **kwargs)
        if torch.cuda.is_current_stream_capturing():
            terms["loss"].sum().item()  # a device-to-host read: invalidates the capture
        return terms

    monkeypatch.setattr(step_mod, "loss_terms", syncing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary = fit(overrides(gpu_data, tmp_path / "run", "train.cuda_graphs=on", "train.max_steps=20"))
    graph_warnings = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert len(graph_warnings) == 1 and "capture failed" in graph_warnings[0], graph_warnings
    assert summary["steps"] == 20 and summary["step"].startswith("eager: capture failed")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    monkeypatch.setattr(step_mod, "loss_terms", original)
    fit(overrides(gpu_data, tmp_path / "eager", "train.cuda_graphs=off", "train.max_steps=20"))
    run, eager = load_weights(tmp_path / "run"), load_weights(tmp_path / "eager")
    assert all(torch.equal(run[k], eager[k]) for k in eager)


def test_fp16_counts_the_steps_its_scaler_skipped(
    gpu_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fused Adam the skip happens inside the kernel; the count comes from the scale's drops on
    the device. One forced overflow (an infinite loss at step 15) is one more skipped step."""
    import json

    import vae_dist.step as step_mod

    args = ["train.precision=fp16", "train.max_steps=30"]
    fit(overrides(gpu_data, tmp_path / "plain", *args))
    original, calls = step_mod.loss_terms, [0]

    def overflow_once(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 16:  # step 15's forward (one micro-batch a step)
            terms["loss"] = terms["loss"] * float("inf")
        return terms

    monkeypatch.setattr(step_mod, "loss_terms", overflow_once)
    fit(overrides(gpu_data, tmp_path / "forced", *args))

    def skipped(run: Path) -> int:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train"][-1]["fp16_skipped_steps"]

    assert skipped(tmp_path / "forced") == skipped(tmp_path / "plain") + 1
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "forced").values())


def test_the_graph_is_released_before_the_process_group(
    gpu_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NCCL cannot destroy a communicator a live graph captured a collective of: the one end of a run
    frees the graph first, on a finished run and on a preempted one."""
    from vae_dist.run import Run
    from vae_dist.step import TrainStep

    steps, seen = [], []
    release, destroy = TrainStep.release_graph, Run.destroy_process_group

    def keep(self) -> None:
        steps.append(self)
        release(self)

    def record(self) -> None:  # at the process group's end: was the graph freed already?
        seen.append(bool(steps) and steps[-1].graph is None and steps[-1].static_x is None)
        destroy(self)

    monkeypatch.setattr(TrainStep, "release_graph", keep)
    monkeypatch.setattr(Run, "destroy_process_group", record)
    trainer, summary = fit(overrides(gpu_data, tmp_path / "run", "train.cuda_graphs=on", "train.max_steps=20"))
    assert summary["step"] == GRAPHED and seen == [True]
    trainer, summary = fit(overrides(gpu_data, tmp_path / "stop", "train.cuda_graphs=on"), stop_at=15)
    assert summary["preempted"] and seen == [True, True]
