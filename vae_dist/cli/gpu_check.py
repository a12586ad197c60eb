"""The GPU check: one command for a person with a GPU, in place, with the Python already there.

    make gpu-check ARGS="--data-root /path/to/data"     # the folder holding MNIST/raw/
    python3 -m vae_dist.cli.gpu_check --data-root ../shared/data --out gpu-check

It runs, from the repository root, each step in a subprocess with a time limit:
  1. the tests marked `cuda` (tests/test_cuda.py; needs pytest);
  2. `vae-bench --device cuda` at batch 100 and 1000: original, minimal, floor, toolkit;
  3. the reference experiment, `configs/mnist.yaml` (40 epochs), timed from process start to exit
     (needs MNIST under --data-root; otherwise reported as not run);
  4. with 2 or more GPUs: 20 steps of 1 GPU x 100 against 2 GPUs x 50 (the same parameters, to
     1e-5), both real `accelerate launch` runs; with one GPU this check is reported, not required;
  5. the IWAE paper's k = 50 network (configs/iwae_paper_iwae.yaml, batch 20) for IWAE_STEPS steps
     with each of the reparameterisation and DReG gradients: training examples/s and how the step
     ran (one CUDA graph, or eager and why). Reported, never part of the verdict: it sizes the
     3,280-epoch runs (RESULTS.md) and shows that DReG's step is captured; run last, in what the
     budget has left.
Each step has its own time limit within an overall budget of BUDGET_S (a check is asked to finish
under 8 minutes); a step that no longer fits is reported as not run. Then it prints a table and a
verdict against the targets and writes --out/report.md, report.json, the logs and the reference
run's pictures. Tracking is off (no wandb needed); no virtual environment, install or network.

Verdict and exit code: PASS (0) every check ran and met its target; FAIL (1) a target was missed or
a step failed; INCOMPLETE (3) nothing missed, but a check could not run (no pytest, no MNIST, the
time budget); 2: torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vae_dist.errors import EXIT_BAD_INPUT
from vae_dist.pipes import quiet_when_the_reader_leaves

REPO = Path(__file__).resolve().parents[2]  # the steps run from the repository root
FLOOR_RATIO = 0.8  # toolkit / graph floor at batch 100
REFERENCE_WALL_S = 20.0  # the 40-epoch reference experiment, process start to exit
REFERENCE_ELBO = 138.0  # its final test -ELBO (nats)
INVARIANCE_RTOL = 1e-5  # 1 x 100 vs 2 x 50
EXIT_AFTER_LAST_STEP_S = 60.0  # a graphed 2-GPU run, from its export to its exit
BENCH_STEPS = {100: 600, 1000: 120}  # timed steps per repeat: long enough for the graphed variants
BUDGET_S = 470.0  # all steps together: under 8 minutes of device time, with room for start-up and report
LIMITS_S = {"tests": 200, "bench": 120, "reference": 90, "multi": 90, "iwae": 60}  # each run's own cap
IWAE_STEPS = 600  # optimizer steps of each IWAE throughput run: 12,000 examples x 50 samples at batch 20
IWAE_ESTIMATORS = ("reparam", "dreg")
DEADLINE = [math.inf]  # time.perf_counter() by which every step must be done (set by main)


def run(name: str, cmd: list[str], out: Path, limit: float) -> dict:
    """Run one step, its output saved to out/<name>.log; returns its exit code, wall seconds and output.
    It gets `limit` seconds or what the overall budget has left; code "not run" when nothing is left."""
    timeout = min(limit, DEADLINE[0] - time.perf_counter())
    if timeout < 5:
        return {"code": "not run", "wall_s": 0.0, "stdout": "", "stderr": "the time budget was spent"}
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    # A session of its own: a step that runs out of time is killed with everything it started (a
    # launcher's workers, a figure worker), so no process outlives the check.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        code, stderr = (
            "timeout",
            f"stopped after {timeout:.0f} s (its limit within the budget); its processes were killed",
        )
    wall = time.perf_counter() - t0
    ended = time.time()
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    tail = (stdout + stderr).strip().splitlines()[-12:]
    print("\n".join(f"   {line}" for line in tail), f"\n   ({wall:.1f} s, exit {code})", flush=True)
    return {"code": code, "wall_s": wall, "stdout": stdout, "stderr": stderr, "ended": ended}


def free_port() -> int:
    """A TCP port nobody listens on now: the 2-GPU run's rendezvous (29500 may be taken by another run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(r: dict) -> str:
    return ((r["stderr"] or r["stdout"]).strip().splitlines() or ["no output"])[-1]


def cuda_tests(out: Path) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "not run", "why": "pytest is not installed in this Python"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    r = run("cuda_tests", cmd, out, LIMITS_S["tests"])
    if r["code"] == "not run":
        return {"status": "not run", "why": last_line(r)}
    summary = next((x for x in reversed(r["stdout"].splitlines()) if " passed" in x or " failed" in x), last_line(r))
    return {"status": "pass" if r["code"] == 0 else "fail", "summary": summary.strip("= "), "wall_s": r["wall_s"]}


def bench(out: Path, batch: int, data_root: str) -> dict:
    json_path = out / f"bench_{batch}.json"
    cmd = [sys.executable, "-m", "vae_dist.cli.bench", "--device", "cuda", "--batch-size", str(batch)]
    cmd += ["--steps", str(BENCH_STEPS[batch]), "--repeats", "3", "--no-memory", "--json", str(json_path)]
    r = run(f"bench_{batch}", [*cmd, f"data.root={data_root}"], out, LIMITS_S["bench"])
    if r["code"] == "not run":
        return {"status": "not run", "why": last_line(r)}
    if r["code"] != 0 or not json_path.exists():
        return {"status": "fail", "why": last_line(r)}
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
    cmd = [sys.executable, "-m", "vae_dist.cli.train", "--config", "configs/mnist.yaml", f"data.root={data_root}"]
    cmd += [f"run.dir={run_dir}", "tracking.mode=off", "train.device=cuda"]
    try:
        r = run("reference", cmd, out, LIMITS_S["reference"])
        if r["code"] == "not run":
            return {"status": "not run", "why": last_line(r)}
        tests = []
        if (run_dir / "metrics.jsonl").exists():
            tests = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"test"' in x]
        for name in ("loss.png", "recon.png", "prior.png", "manifold.png", "latent.png"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, out / name)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    elbo = tests[-1]["elbo"] if tests else math.nan
    summary = [x.split("vae_dist run: ", 1)[1] for x in r["stdout"].splitlines() if "vae_dist run: " in x]
    ok = r["code"] == 0 and r["wall_s"] <= REFERENCE_WALL_S and elbo <= REFERENCE_ELBO
    return {
        "status": "pass" if ok else "fail",
        "wall_s": round(r["wall_s"], 2),
        "final_test_elbo": elbo,
        "summary": summary,
        "exit": r["code"],
    }


def random_mnist(root: Path) -> str:
    """Random images of MNIST's shape written as IDX files under root/MNIST/raw: a data.root."""
    import torch

    from vae_dist.data import write_idx

    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 10_000), ("t10k", 1_000)):
        images = torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=g)
        write_idx(root / "MNIST" / "raw", prefix, images, torch.randint(0, 10, (n,), generator=g))
    return str(root)


def two_gpus(out: Path, data_root: str | None) -> dict:
    """20 steps of 1 GPU x micro 100 against 2 GPUs x micro 50: the same parameters. Short on purpose:
    over thousands of steps the rounding of different kernel shapes grows past any tolerance."""
    import torch
    from safetensors.torch import load_file

    if torch.cuda.device_count() < 2:
        return {"status": "not run", "why": f"{torch.cuda.device_count()} GPU here", "optional": True}
    root = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
    have_mnist = data_root and (Path(data_root) / "MNIST" / "raw").is_dir()
    data = data_root if have_mnist else random_mnist(root / "data")
    args = ["-m", "vae_dist.cli.train", "--config", "configs/mnist.yaml", f"data.root={data}", "train.max_steps=20"]
    args += ["tracking.mode=off", "tracking.log_every_steps=10", "train.device=cuda"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    runs = {
        "one_gpu": run(
            "gpus_1", [*launch, "--num_processes", "1", *args, f"run.dir={root / 'one'}"], out, LIMITS_S["multi"]
        ),
        "two_gpus": run(
            "gpus_2",
            [*launch, "--multi_gpu", "--num_processes", "2", *args, f"run.dir={root / 'two'}"],
            out,
            LIMITS_S["multi"],
        ),
    }
    result = {name: {"exit": r["code"], "wall_s": round(r["wall_s"], 1)} for name, r in runs.items()}
    for name, r in runs.items():  # "one CUDA graph a step", or eager and why
        result[name]["step"] = next(
            (x.split("(", 1)[-1].rstrip(")") for x in r["stdout"].splitlines() if "optimizer steps" in x), ""
        )
    codes = [r["code"] for r in runs.values()]
    exported = root / "two" / "model.safetensors"
    if exported.exists():
        # From the export (after the last step, evaluation and checkpoint) to the exit: the run's end,
        # where a graph that still held NCCL's all-reduce would make the process group's destroy hang.
        result["two_gpus"]["exit_after_export_s"] = round(runs["two_gpus"]["ended"] - exported.stat().st_mtime, 1)
    if codes == [0, 0]:
        a, b = load_file(str(exported)), load_file(str(root / "one" / "model.safetensors"))
        rel = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)
        slow_exit = result["two_gpus"]["exit_after_export_s"] > EXIT_AFTER_LAST_STEP_S
        result.update(relative_difference=rel, status="pass" if rel <= INVARIANCE_RTOL and not slow_exit else "fail")
        if slow_exit:
            result["why"] = f"the 2-GPU run took {result['two_gpus']['exit_after_export_s']} s to exit after its export"
    else:
        result["status"] = "not run" if "not run" in codes else "fail"
        result["why"] = "; ".join(last_line(r) for r in runs.values() if r["code"] != 0)
    shutil.rmtree(root, ignore_errors=True)
    return result


def iwae_throughput(out: Path, data_root: str | None) -> dict:
    """IWAE_STEPS steps of configs/iwae_paper_iwae.yaml per estimator: the last train record's examples/s
    (its window starts after the capture) and the step's description. Not part of the verdict."""
    root = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
    have_mnist = data_root and (Path(data_root) / "MNIST" / "raw").is_dir()
    data = data_root if have_mnist else random_mnist(root / "data")
    result: dict = {"status": "ok", "data": "MNIST" if have_mnist else "random images", "steps": IWAE_STEPS}
    try:
        for estimator in IWAE_ESTIMATORS:
            run_dir = root / estimator
            cmd = [sys.executable, "-m", "vae_dist.cli.train", "--config", "configs/iwae_paper_iwae.yaml"]
            cmd += [f"data.root={data}", f"run.dir={run_dir}", f"model.estimator={estimator}", "train.device=cuda"]
            cmd += [f"train.max_steps={IWAE_STEPS}", f"tracking.log_every_steps={IWAE_STEPS // 3}", "tracking.mode=off"]
            cmd += ["tracking.images_every_epochs=0", "checkpoint.every_epochs=0"]
            r = run(f"iwae_{estimator}", cmd, out, LIMITS_S["iwae"])
            records = []
            if (run_dir / "metrics.jsonl").exists():
                records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [x for x in records if x["split"] == "train"]
            step = next(
                (x.split("(", 1)[-1].rstrip(")") for x in r["stdout"].splitlines() if "optimizer steps" in x), ""
            )
            entry = {"exit": r["code"], "wall_s": round(r["wall_s"], 1), "step": step}
            if r["code"] == 0 and train:
                entry["examples_per_s"] = round(train[-1]["examples_per_s"])
                entry["train_loss"] = round(train[-1]["loss"], 2)
            else:
                result["status"] = "not run" if r["code"] == "not run" else "fail"
                entry["why"] = last_line(r)
            result[estimator] = entry
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def verdict(report: dict) -> tuple[str, list[str], list[str]]:
    """("PASS" | "FAIL" | "INCOMPLETE", what missed its target, what could not run)."""
    misses, missing = [], []
    t = report["cuda_tests"]
    if t["status"] == "fail":
        misses.append(f"cuda tests: {t.get('summary')}")
    elif t["status"] != "pass":
        missing.append(f"cuda tests: {t.get('why')}")
    b = report["bench_100"]
    ratio = b.get("ratios", {}).get("toolkit/floor")
    if b["status"] == "ok" and ratio is not None and ratio < FLOOR_RATIO:
        misses.append(f"toolkit/floor at batch 100: {ratio} (target >= {FLOOR_RATIO})")
    elif b["status"] == "fail":
        misses.append(f"bench at batch 100: {b.get('why')}")
    elif b["status"] != "ok":
        missing.append(f"bench at batch 100: {b.get('why')}")
    ref = report["reference"]
    if ref["status"] == "fail":
        misses.append(
            f"reference: {ref['wall_s']} s (target <= {REFERENCE_WALL_S}), test elbo {ref['final_test_elbo']:.2f} "
            f"(target <= {REFERENCE_ELBO}), exit {ref['exit']}"
        )
    elif ref["status"] != "pass":
        missing.append(f"reference: {ref.get('why')}")
    g = report["two_gpus"]
    if g["status"] == "fail":
        misses.append(f"2 GPUs: relative difference {g.get('relative_difference')}, {g.get('why', '')}")
    elif g["status"] != "pass" and not g.get("optional"):
        missing.append(f"2 GPUs: {g.get('why')}")
    return ("FAIL" if misses else "INCOMPLETE" if missing else "PASS"), misses, missing


def table(report: dict) -> str:
    head = f"vae_dist gpu-check: {report['gpu']} x {report['gpus']}, torch {report['torch']}, CPU {report['cpu']}"
    lines = [head, "", "| check | result | target |", "| --- | --- | --- |"]
    t = report["cuda_tests"]
    lines.append(f"| cuda tests | {t.get('summary') or t['status'] + ': ' + str(t.get('why'))} | all pass |")
    for batch in (100, 1000):
        b = report[f"bench_{batch}"]
        target = f"toolkit/floor >= {FLOOR_RATIO}" if batch == 100 else ""
        if b["status"] != "ok":
            lines.append(f"| bench batch {batch} | {b['status']}: {b.get('why')} | {target} |")
            continue
        eps = ", ".join(f"{k} {v:,}" for k, v in b["examples_per_s"].items())
        ratios = ", ".join(f"{k} {v}" for k, v in b["ratios"].items())
        lines.append(f"| bench batch {batch} (examples/s) | {eps}; {ratios}; toolkit: {b['toolkit_step']} | {target} |")
    ref, target = report["reference"], f"<= {REFERENCE_WALL_S} s, elbo <= {REFERENCE_ELBO}"
    if ref["status"] == "not run":
        lines.append(f"| reference, 40 epochs | not run: {ref['why']} | {target} |")
    else:
        lines.append(
            f"| reference, 40 epochs | {ref['wall_s']} s wall, test elbo {ref['final_test_elbo']:.2f} | {target} |"
        )
        lines += [f"|   {x} | | |" for x in ref["summary"]]
    g = report["two_gpus"]
    shown = g.get("why") if g["status"] == "not run" else {k: v for k, v in g.items() if k != "status"}
    lines.append(
        f"| 2 GPUs: 1 x 100 vs 2 x 50, 20 steps | {g['status']}: {shown} | difference <= {INVARIANCE_RTOL}, "
        f"exit <= {EXIT_AFTER_LAST_STEP_S:.0f} s after the export |"
    )
    w = report.get("iwae")
    if w is not None:
        if w["status"] == "not run" and "why" in w:
            shown = f"not run: {w['why']}"
        else:
            shown = "; ".join(
                f"{e}: {w[e].get('examples_per_s', 'n/a')} examples/s, {w[e]['step'] or w[e].get('why', '')}"
                for e in IWAE_ESTIMATORS
                if e in w
            )
        lines.append(
            f"| IWAE k = 50, paper network, batch 20, {IWAE_STEPS} steps ({w.get('data', '')}) | {w['status']}: "
            f"{shown} | reported, not part of the verdict |"
        )
    lines += ["", f"verdict: {report['verdict']}"]
    lines += [f"  missed: {m}" for m in report["misses"]] + [f"  not run: {m}" for m in report["not_run"]]
    return "\n".join(lines)


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gpu-check",
        description="Run the GPU checks (CUDA tests, benchmark, timed reference run, 2-GPU equivalence) and print a verdict.",
    )
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (else random data; no reference run)")
    p.add_argument("--out", default="gpu-check", help="folder for the report, logs and pictures (default gpu-check)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: tests, bench, reference, multi, iwae")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: error: torch sees no CUDA device; run this on a machine with a GPU.", file=sys.stderr)
        return EXIT_BAD_INPUT
    DEADLINE[0] = time.perf_counter() + BUDGET_S
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    report = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    report["cpu"] = cpu
    skipped = {"status": "not run", "why": "skipped (--skip)"}
    report["cuda_tests"] = skipped if "tests" in skip else cuda_tests(out)
    for batch in (100, 1000):
        report[f"bench_{batch}"] = skipped if "bench" in skip else bench(out, batch, args.data_root or "data")
    report["reference"] = skipped if "reference" in skip else reference(out, args.data_root)
    report["two_gpus"] = skipped if "multi" in skip else two_gpus(out, args.data_root)
    report["iwae"] = skipped if "iwae" in skip else iwae_throughput(out, args.data_root)  # last: not in the verdict
    report["verdict"], report["misses"], report["not_run"] = verdict(report)
    text = table(report)
    print("\n" + text)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return {"PASS": 0, "FAIL": 1, "INCOMPLETE": 3}[report["verdict"]]


if __name__ == "__main__":
    sys.exit(main())
