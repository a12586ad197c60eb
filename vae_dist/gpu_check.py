"""The GPU check (issue 12): one command for a person with a GPU, in place, with the Python already there.

    make gpu-check ARGS="--data-root /path/to/data"     # the folder holding MNIST/raw/
    python3 -m vae_dist.gpu_check --data-root ../shared/data --out gpu-check

It runs, from the repository root, each step in a subprocess with a time limit:
  1. the tests marked `cuda` (tests/test_cuda.py; needs pytest);
  2. `vae-bench --device cuda` at batch 100 and 1000: original, minimal, floor, toolkit;
  3. the reference experiment, `configs/mnist.yaml` (40 epochs), timed from process start to exit
     (needs MNIST under --data-root; otherwise reported as not run);
  4. with 2 or more GPUs: 1 GPU x 100 against 2 GPUs x 50 (same parameters, to 1e-5), each a real run.
Then it prints a table and a verdict against the targets, and writes everything to --out (JSON +
logs). Tracking is off (no wandb needed); no virtual environment, install or network is used.
Exit code: 0 every target met; 1 a target missed or a step failed; 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOOR_RATIO = 0.8  # toolkit / graph floor at batch 100
REFERENCE_WALL_S = 20.0  # the 40-epoch reference experiment, process start to exit
REFERENCE_ELBO = 138.0  # its final test -ELBO (nats)
INVARIANCE_RTOL = 1e-5  # 1 x 100 vs 2 x 50
BENCH_STEPS = {100: 600, 1000: 120}  # timed steps per repeat: long enough for the graphed variants


def run(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one step, its output teed to out/<name>.log; returns returncode, wall seconds, output."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        code, stdout, stderr = (
            "timeout",
            (err.stdout or b"").decode(errors="replace"),
            f"timed out after {timeout:.0f} s",
        )
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    tail = (stdout + stderr).strip().splitlines()[-12:]
    print("\n".join(f"   {line}" for line in tail), f"\n   ({wall:.1f} s, exit {code})", flush=True)
    return {"code": code, "wall_s": wall, "stdout": stdout, "stderr": stderr}


def cuda_tests(out: Path) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "not run", "why": "pytest is not installed in this Python"}
    r = run(
        "cuda_tests",
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        out,
        300,
    )
    summary = next((line for line in reversed(r["stdout"].splitlines()) if " passed" in line or " failed" in line), "")
    return {"status": "pass" if r["code"] == 0 else "fail", "summary": summary.strip("= "), "wall_s": r["wall_s"]}


def bench(out: Path, batch: int, data_root: str) -> dict:
    json_path = out / f"bench_{batch}.json"
    cmd = [sys.executable, "-m", "vae_dist.bench", "--device", "cuda", "--batch-size", str(batch)]
    cmd += ["--steps", str(BENCH_STEPS[batch]), "--repeats", "3", "--no-memory", "--json", str(json_path)]
    r = run(f"bench_{batch}", [*cmd, f"data.root={data_root}"], out, 240)
    if r["code"] != 0 or not json_path.exists():
        return {"status": "fail", "why": (r["stderr"].strip().splitlines() or ["no output"])[-1]}
    result = json.loads(json_path.read_text())
    v = result["variants"]
    return {
        "status": "ok",
        "examples_per_s": {k: round(x["examples_per_s"]) for k, x in v.items()},
        "ms_per_step": {k: round(x["ms_per_step"], 3) for k, x in v.items()},
        "ratios": {k: round(x, 3) for k, x in result["ratios"].items()},
        "toolkit_step": result["settings"].get("toolkit_step"),
        "data": result["settings"]["data"],
    }


def reference(out: Path, data_root: str | None) -> dict:
    if not data_root or not (Path(data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return {"status": "not run", "why": "no MNIST under --data-root (give the folder holding MNIST/raw/)"}
    run_dir = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
    try:
        cmd = [sys.executable, "-m", "vae_dist.train", "--config", "configs/mnist.yaml", f"data.root={data_root}"]
        r = run("reference", [*cmd, f"run.dir={run_dir}", "tracking.mode=off", "train.device=cuda"], out, 300)
        tests = []
        if (run_dir / "metrics.jsonl").exists():
            tests = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"test"' in x]
        elbo = tests[-1]["elbo"] if tests else math.nan
        summary = [line.split("vae_dist run: ", 1)[1] for line in r["stdout"].splitlines() if "vae_dist run: " in line]
        for name in ("loss.png", "recon.png", "prior.png", "manifold.png", "latent.png"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, out / name)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    ok = r["code"] == 0 and r["wall_s"] <= REFERENCE_WALL_S and elbo <= REFERENCE_ELBO
    return {
        "status": "pass" if ok else "fail",
        "wall_s": round(r["wall_s"], 2),
        "final_test_elbo": elbo,
        "summary": summary,
        "exit": r["code"],
    }


def two_gpus(out: Path, data_root: str | None) -> dict:
    """1 GPU x micro 100 against 2 GPUs x micro 50, 2 epochs each: the same parameters."""
    import torch
    from safetensors.torch import load_file

    if torch.cuda.device_count() < 2:
        return {"status": "not run", "why": f"{torch.cuda.device_count()} GPU here"}
    root = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
    data = data_root if data_root and (Path(data_root) / "MNIST" / "raw").is_dir() else None
    if data is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_mnist

        data = str(make_mnist(root / "data", n_train=10_000, n_test=1_000))
    args = ["-m", "vae_dist.train", "--config", "configs/mnist.yaml", f"data.root={data}", "train.epochs=2"]
    args += ["tracking.mode=off", "tracking.images_every_epochs=0", "train.device=cuda"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    one = run("gpus_1", [*launch, "--num_processes", "1", *args, f"run.dir={root / 'one'}"], out, 300)
    two = run("gpus_2", [*launch, "--multi_gpu", "--num_processes", "2", *args, f"run.dir={root / 'two'}"], out, 300)
    result = {
        "one_gpu": {"exit": one["code"], "wall_s": round(one["wall_s"], 1)},
        "two_gpus": {"exit": two["code"], "wall_s": round(two["wall_s"], 1)},
    }
    if one["code"] == 0 and two["code"] == 0:
        a, b = load_file(str(root / "two" / "model.safetensors")), load_file(str(root / "one" / "model.safetensors"))
        rel = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)
        result.update(relative_difference=rel, status="pass" if rel <= INVARIANCE_RTOL else "fail")
        result["two_gpus"]["step"] = next((x for x in two["stdout"].splitlines() if "optimizer steps" in x), "")
    else:
        result["status"] = "fail"
    shutil.rmtree(root, ignore_errors=True)
    return result


def verdict(report: dict) -> list[str]:
    """What missed its target (empty: all met); steps that could not run are listed in the table only."""
    misses = []
    if report["cuda_tests"]["status"] == "fail":
        misses.append(f"cuda tests: {report['cuda_tests'].get('summary')}")
    b = report["bench_100"]
    ratio = b.get("ratios", {}).get("toolkit/floor")
    if b["status"] != "skipped" and (ratio is None or ratio < FLOOR_RATIO):
        misses.append(f"toolkit/floor at batch 100: {ratio} (target >= {FLOOR_RATIO})")
    ref = report["reference"]
    if ref["status"] == "fail":
        misses.append(
            f"reference: {ref['wall_s']} s (target <= {REFERENCE_WALL_S}), test elbo {ref['final_test_elbo']:.2f} "
            f"(target <= {REFERENCE_ELBO}), exit {ref['exit']}"
        )
    if report["two_gpus"]["status"] == "fail":
        misses.append(f"2 GPUs: {report['two_gpus']}")
    return misses


def table(report: dict) -> str:
    lines = [
        f"vae_dist gpu-check: {report['gpu']} x {report['gpus']}, torch {report['torch']}, CPU {report['cpu']}",
        "",
    ]
    lines += ["| check | result | target |", "| --- | --- | --- |"]
    t = report["cuda_tests"]
    lines.append(f"| cuda tests | {t.get('summary') or t['status'] + ': ' + t.get('why', '')} | all pass |")
    for batch in (100, 1000):
        b = report[f"bench_{batch}"]
        if b["status"] != "ok":
            lines.append(f"| bench batch {batch} | failed: {b.get('why')} | |")
            continue
        eps = ", ".join(f"{k} {v:,}" for k, v in b["examples_per_s"].items())
        target = f"toolkit/floor >= {FLOOR_RATIO}" if batch == 100 else ""
        lines.append(
            f"| bench batch {batch} (examples/s) | {eps}; {', '.join(f'{k} {v}' for k, v in b['ratios'].items())}; toolkit step: {b['toolkit_step']} | {target} |"
        )
    ref = report["reference"]
    if ref["status"] == "not run":
        lines.append(
            f"| reference, 40 epochs | not run: {ref['why']} | <= {REFERENCE_WALL_S} s, elbo <= {REFERENCE_ELBO} |"
        )
    else:
        lines.append(
            f"| reference, 40 epochs | {ref['wall_s']} s wall, test elbo {ref['final_test_elbo']:.2f} | <= {REFERENCE_WALL_S} s, elbo <= {REFERENCE_ELBO} |"
        )
        lines += [f"|   {x} | | |" for x in ref["summary"]]
    g = report["two_gpus"]
    lines.append(f"| 2 GPUs: 1 x 100 vs 2 x 50 | {g.get('why') or g} | relative difference <= {INVARIANCE_RTOL} |")
    misses = report["misses"]
    lines += ["", "verdict: " + ("PASS (every target met)" if not misses else "FAIL: " + "; ".join(misses))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description="Run the GPU checks of issue 12 and print a verdict.")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (else random data; no reference run)")
    p.add_argument(
        "--out", default="gpu-check", help="folder for the JSON report, logs and pictures (default gpu-check)"
    )
    p.add_argument("--skip", default="", help="comma-separated steps to skip: tests, bench, reference, multi")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: error: torch sees no CUDA device; run this on a machine with a GPU.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        "?",
    )
    report = {
        "gpu": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cpu": cpu,
    }
    data_root = args.data_root or "data"
    not_run = {"status": "not run", "why": "skipped (--skip)"}
    report["cuda_tests"] = not_run if "tests" in skip else cuda_tests(out)
    for batch in (100, 1000):
        report[f"bench_{batch}"] = (
            {"status": "skipped", "why": "--skip"} if "bench" in skip else bench(out, batch, data_root)
        )
    report["reference"] = not_run if "reference" in skip else reference(out, args.data_root)
    report["two_gpus"] = not_run if "multi" in skip else two_gpus(out, args.data_root)
    report["misses"] = verdict(report)
    text = table(report)
    print("\n" + text)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if not report["misses"] else 1


if __name__ == "__main__":
    sys.exit(main())
