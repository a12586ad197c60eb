"""The parts of `make gpu-check` (vae_dist/cli/gpu_check.py) a machine without a GPU can check: its refusal,
its time budget, its verdict and its random data. Run: pytest tests/test_gpu_check.py"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

from vae_dist.cli import gpu_check
from vae_dist.config import DataConfig
from vae_dist.data import load_data


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path, capsys) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_each_step_gets_its_limit_within_the_budget(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "DEADLINE", [time.perf_counter() + 60])
    quick = gpu_check.run("quick", [sys.executable, "-c", "print('hi')"], tmp_path, limit=30)
    assert quick["code"] == 0 and "hi" in (tmp_path / "quick.log").read_text()
    slow = gpu_check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, limit=6)
    assert slow["code"] == "timeout" and slow["wall_s"] < 20
    monkeypatch.setattr(gpu_check, "DEADLINE", [time.perf_counter() + 1])  # the budget is spent
    assert gpu_check.run("late", [sys.executable, "-c", "pass"], tmp_path, limit=30)["code"] == "not run"


def test_a_step_that_runs_out_of_time_leaves_no_process_behind(tmp_path: Path, monkeypatch) -> None:
    """A launcher-like step: a parent that starts a child which would outlive it; both are killed."""
    import os

    monkeypatch.setattr(gpu_check, "DEADLINE", [time.perf_counter() + 60])
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    r = gpu_check.run("hangs", [sys.executable, "-c", script], tmp_path, limit=6)
    assert r["code"] == "timeout" and "its processes were killed" in r["stderr"]
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A killed child is a zombie until its parent (also killed) is reaped by init: gone from /proc soon.
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} outlived the step")


def report(**changes) -> dict:
    """A report as main() builds it where every check ran and met its target."""
    ok = {
        "cuda_tests": {"status": "pass", "summary": "7 passed"},
        "bench_100": {"status": "ok", "ratios": {"toolkit/floor": 0.85}},
        "bench_1000": {"status": "ok", "ratios": {"toolkit/floor": 0.9}},
        "reference": {"status": "pass", "wall_s": 15.0, "final_test_elbo": 137.9, "exit": 0},
        "two_gpus": {"status": "not run", "why": "1 GPU here", "optional": True},
    }
    return {**ok, **changes}


def test_the_verdict_separates_a_miss_from_a_check_that_could_not_run() -> None:
    assert gpu_check.verdict(report()) == ("PASS", [], [])
    slow = {"status": "ok", "ratios": {"toolkit/floor": 0.5}}
    verdict, misses, _ = gpu_check.verdict(report(bench_100=slow))
    assert verdict == "FAIL" and misses == ["toolkit/floor at batch 100: 0.5 (target >= 0.8)"]
    over = {"status": "fail", "wall_s": 25.0, "final_test_elbo": 138.5, "exit": 0}
    verdict, misses, _ = gpu_check.verdict(report(reference=over))
    assert verdict == "FAIL" and "25.0 s (target <= 20.0), test elbo 138.50 (target <= 138.0)" in misses[0]
    no_pytest = {"status": "not run", "why": "pytest is not installed in this Python"}
    assert gpu_check.verdict(report(cuda_tests=no_pytest)) == (
        "INCOMPLETE",
        [],
        ["cuda tests: pytest is not installed in this Python"],
    )
    no_data = {"status": "not run", "why": "no MNIST under --data-root", "wall_s": math.nan}
    assert gpu_check.verdict(report(reference=no_data))[0] == "INCOMPLETE"


def test_random_mnist_is_a_data_root_the_trainer_reads(tmp_path: Path) -> None:
    root = gpu_check.random_mnist(tmp_path / "data")
    train, test = load_data(DataConfig(root=root, download=False))
    assert train.images.shape == (10_000, 784) and test.images.shape == (1_000, 784)


def test_the_iwae_throughput_is_reported_never_judged() -> None:
    failed = {"status": "fail", "data": "MNIST", "reparam": {"exit": 1, "wall_s": 3.0, "step": "", "why": "boom"}}
    assert gpu_check.verdict(report(iwae=failed)) == ("PASS", [], [])
    ok = {
        "status": "ok",
        "data": "MNIST",
        "reparam": {"exit": 0, "wall_s": 20.0, "step": "one CUDA graph a step", "examples_per_s": 50_000},
        "dreg": {"exit": 0, "wall_s": 22.0, "step": "one CUDA graph a step", "examples_per_s": 40_000},
    }
    skipped = {"status": "not run", "why": "skipped (--skip)"}
    full = {**report(iwae=ok, bench_100=skipped, bench_1000=skipped, reference=skipped), "gpu": "H100", "gpus": 1}
    full.update(torch="2.x")
    full.update(cpu="x", verdict="PASS")
    line = next(x for x in gpu_check.table({**full, "misses": [], "not_run": []}).splitlines() if "IWAE" in x)
    assert "reparam: 50000 examples/s, one CUDA graph a step; dreg: 40000 examples/s" in line
    assert "not part of the verdict" in line
