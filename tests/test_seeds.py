"""`vae-seeds`: N seeds of the smoke config on the CPU, each an ordinary run; a seed that fails is named.
Run: pytest tests/test_seeds.py  (~45 s on 2 cores: real vae-train processes on tiny data)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env
from vae_dist.cli.seeds import plan, seed_overrides
from vae_dist.config import load_config
from vae_dist.runlock import RunLock


def seeds(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vae_dist.cli.seeds", "--config", str(REPO / "configs" / "smoke.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=timeout)


def smoke(data_root: Path, run_dir: Path) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", f"run.dir={run_dir}", "model.hidden_dims=[64,32]"]


def final_elbo(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "test"][-1]["elbo"]


@pytest.mark.slow
def test_three_seeds_of_the_smoke_config_are_three_ordinary_runs(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "smoke"
    proc = seeds("--seeds", "3", "--base-seed", "5", *smoke(data_root, sweep))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vae-seeds: 3 of 3 seeds finished" in proc.stdout and "not finished" not in proc.stdout
    finals = []
    for seed in (5, 6, 7):
        run = sweep / f"seed-{seed}"
        cfg = load_config(run / "config.yaml")
        assert cfg.train.seed == seed and cfg.run.dir == str(run) and cfg.tracking.group == "smoke"
        assert (run / "model.safetensors").is_file() and (run / ".lock").is_file()
        assert "vae-seeds: " in (run / "train.log").read_text()  # each seed's own log, its command first
        finals.append(final_elbo(run))
    assert len(set(finals)) == 3  # three seeds, three different draws

    table = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.results", str(sweep), "--json"], capture_output=True, text=True, cwd=REPO
    )
    [row] = json.loads(table.stdout)["groups"]
    assert row["n"] == 3 and row["seeds"] == [5, 6, 7]
    assert row["final_elbo"]["mean"] == pytest.approx(sum(finals) / 3)


@pytest.mark.slow
def test_a_seed_that_fails_makes_the_exit_code_non_zero_and_is_named(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "smoke"
    with RunLock(sweep / "seed-1"):  # another run holds seed 1's run.dir: that seed is refused (exit 2)
        proc = seeds("--seeds", "2", *smoke(data_root, sweep))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vae-seeds: 1 of 2 seeds finished" in proc.stdout
    named = proc.stdout.splitlines()[-2]
    assert named.startswith("not finished: seed 1 (refused its input (nothing trained): vae-train: error: run.dir=")
    assert "is in use by" in named
    assert (sweep / "seed-0" / "model.safetensors").is_file() and not (sweep / "seed-1" / "metrics.jsonl").exists()


def test_the_cpu_plan_gives_each_process_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import vae_dist.cli.seeds as seeds_module

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(seeds_module, "usable_cores", lambda: 8)
    cfg = load_config(None, ["run.dir=runs/sweep"])
    runs, slots = plan(cfg, [0, 1, 2, 3], None, [])  # by default the seeds share the cores
    assert len(slots) == 4 and all("train.cpu_threads=2" in r.overrides for r in runs)
    assert all(r.env["OMP_NUM_THREADS"] == "2" for r in runs)
    runs, slots = plan(cfg, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], None, [])  # one per core, the rest wait
    assert len(slots) == 8 and "train.cpu_threads=1" in runs[0].overrides
    runs, slots = plan(cfg, [0, 1, 2], 1, [])  # --parallel 1: one after another, all cores each
    assert slots == ["CPU (all cores)"] and "train.cpu_threads=8" in runs[0].overrides
    chosen = load_config(None, ["run.dir=runs/sweep", "train.cpu_threads=3"])
    runs, slots = plan(chosen, [0, 1, 2], None, ["train.cpu_threads=3"])  # the user's threads stand: 8 // 3 at once
    assert len(slots) == 2 and not any(o == "train.cpu_threads=2" for r in runs for o in r.overrides)
    assert seed_overrides(cfg, 4) == ["train.seed=4", "run.dir=runs/sweep/seed-4", "tracking.group=sweep"]
    assert "tracking.group=sweep" not in seed_overrides(load_config(None, ["tracking.group=mine"]), 4)


def test_one_seed_per_gpu_each_seeing_only_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    runs, slots = plan(load_config(None, []), [0, 1, 2], None, [])
    assert slots == ["GPU 2", "GPU 5"] and not any(o.startswith("train.cpu_threads") for r in runs for o in r.overrides)


@pytest.mark.slow
def test_a_stop_signal_checkpoints_the_running_seed_and_the_same_command_resumes(
    data_root: Path, tmp_path: Path
) -> None:
    import signal
    import time

    sweep = tmp_path / "smoke"
    # 1000 steps per seed (tiny data, batch 20, 50 epochs): long enough for both running seeds to be
    # stopped in the middle (200 steps took 6 s: one seed could finish while the other started);
    # figures only at the end (a drawing takes about a second of CPU).
    args = [*smoke(data_root, sweep), "train.max_steps=null", "train.epochs=50", "train.batch_size=20"]
    args += ["tracking.log_every_steps=10", "tracking.images_every_epochs=0", "--seeds", "3", "--parallel", "2"]
    cmd = [sys.executable, "-m", "vae_dist.cli.seeds", "--config", str(REPO / "configs" / "smoke.yaml"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cpu_env())
    metrics = sweep / "seed-0" / "metrics.jsonl"

    def training(seed: int) -> bool:  # past start-up: its stop-signal handlers are in place
        path = sweep / f"seed-{seed}" / "metrics.jsonl"
        return path.is_file() and path.read_text().count('"train"') >= 3

    # Both running seeds must be training when the signal lands: on a loaded machine seed 1 can still be
    # starting its interpreter when seed 0 logs, and then it dies of the signal instead of checkpointing.
    deadline = time.monotonic() + 240
    while not (training(0) and training(1)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert training(0) and training(1), "the first two seeds never both started training"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "got SIGTERM: stopping the running seeds" in err
    # Both running seeds got the signal; the third had not started.
    assert "seed 0 (stopped by a signal after a checkpoint: rerun to resume)" in out
    assert "seed 1 (stopped by a signal after a checkpoint: rerun to resume)" in out, out + err
    assert "seed 2 (not started (the sweep was stopped first))" in out
    assert list((sweep / "seed-0" / "checkpoints").glob("step-*")) and not (sweep / "seed-2").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resum" in (sweep / "seed-0" / "train.log").read_text().lower()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train"' in line]
    assert steps[-1] == 1000 and steps == sorted(set(steps))  # resumed, not restarted: no step twice
