"""The benchmark command runs and reports what it promises; no timing is asserted.
Run: pytest tests/test_bench.py"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vae_dist.cli import bench

# One thread: on a busy 2-core machine two OpenMP threads can each wait hundreds of ms for a core.
TINY = ["--steps", "3", "--warmup", "1", "--repeats", "2", "--batch-size", "50", "--threads", "1"]
SETTINGS = {
    "device",
    "precision",
    "batch_size",
    "steps",
    "warmup",
    "repeats",
    "compile",
    "threads",
    "data",
    "real_data",
    "torch",
    "denormals",
    "load_average",
    "others_cores_max",
}
VARIANT_FIELDS = {"examples_per_s", "runs", "ms_per_step", "others_cores"}
MEMORY_FIELDS = {"peak_rss_mib", "rss_after_imports_mib", "peak_rss_over_imports_mib"}


def check_result(result: dict, variants=bench.VARIANTS, memory: bool = False) -> None:
    assert SETTINGS <= result["settings"].keys()
    assert {"cpu", "cores"} <= result["machine"].keys()
    assert list(result["variants"]) == list(variants)
    for v in result["variants"].values():
        assert VARIANT_FIELDS | (MEMORY_FIELDS if memory else set()) <= v.keys()
        assert v["examples_per_s"] > 0 and len(v["runs"]) == result["settings"]["repeats"]
        if memory:
            assert v["peak_rss_mib"] >= v["rss_after_imports_mib"] > 0
    if "toolkit" in variants:
        expected = {f"toolkit/{o}" for o in ("original", "minimal", "floor") if o in variants}
        assert set(result["ratios"]) == expected and all(r > 0 for r in result["ratios"].values())
        # The median of per-repeat ratios, recomputed from the runs the JSON reports.
        for key, value in result["median_repeat_ratios"].items():
            other = result["variants"][key.split("/")[1]]["runs"]
            per_repeat = sorted(t / o for t, o in zip(result["variants"]["toolkit"]["runs"], other))
            assert math.isclose(value, statistics.median(per_repeat), rel_tol=1e-2)  # runs are rounded to 0.1


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_module_runs_on_random_data_without_mnist(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vae_dist.cli.bench",
            *TINY,
            "--device",
            "cpu",  # this test means the CPU, also on a machine with a GPU
            "--no-memory",
            "--json",
            str(out),
            f"data.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = last_json(proc.stdout)
    check_result(result)
    assert result["settings"]["real_data"] is False and result["settings"]["device"] == "cpu"
    assert json.loads(out.read_text()) == result
    assert "| toolkit |" in proc.stdout and "toolkit/minimal:" in proc.stdout  # the table before the JSON


def test_real_data_in_process_crosses_epochs(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    # 400 tiny training examples at batch 50: 8 steps an epoch, so warm-up + 3 x 3 steps roll over.
    assert bench.main([*TINY, "--no-memory", f"data.root={data_root}", "data.download=false"]) == 0
    result = last_json(capsys.readouterr().out)
    check_result(result)
    assert result["settings"]["real_data"] is True and result["settings"]["threads"] == 1


def test_memory_probe_reports_peaks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench.main([*TINY, "--probe", "toolkit", f"data.root={tmp_path}"]) == 0
    assert MEMORY_FIELDS <= last_json(capsys.readouterr().out).keys()


@pytest.mark.slow
def test_full_command_with_memory_subprocesses(data_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.bench", *TINY, f"data.root={data_root}", "data.download=false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_result(last_json(proc.stdout), memory=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "fast"], "--variants=fast"),
        (["--steps", "0"], "--steps=0"),
        (["model.objective=iwae", "model.k=2"], "model.objective"),
        (["train.nope=1"], "train.nope"),
    ],
)
def test_bad_input_exits_2_with_a_sentence(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(args) == bench.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("vae-bench: error:") and message in err


@pytest.mark.parametrize(("option", "flush"), [([], True), (["--denormals", "keep"], False)])
def test_toolkit_gets_the_subnormal_mode_of_the_other_variants(option: list[str], flush: bool, tmp_path: Path) -> None:
    cfg = bench.bench_config(
        bench.parse_args([*option, "--threads", "1", f"data.root={tmp_path}"]), str(tmp_path / "run")
    )
    assert cfg.train.flush_denormal is flush
