"""Real multi-process gloo groups on the CPU: the process count, micro-batch and accumulation change
speed, never the result. Run: pytest -m distributed tests/test_distributed.py"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, launch, load_weights

pytestmark = pytest.mark.distributed
PROBE = str(REPO / "tests" / "dist_probe.py")


def probe(nproc: int, out: Path, mode: str, overrides: list[str], cwd: Path) -> list[dict]:
    proc = launch(nproc, [PROBE, str(out), mode, *overrides], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_each_example_once_per_epoch_in_the_same_global_batches(tiny_overrides: list[str], tmp_path: Path) -> None:
    # 400 examples, global batch 100: 1 process x micro 100 versus 2 processes x micro 25 x 2 accumulation.
    one = probe(1, tmp_path / "p1", "order", tiny_overrides + ["train.batch_size=100"], tmp_path)[0]
    two = probe(
        2, tmp_path / "p2", "order", tiny_overrides + ["train.batch_size=100", "train.micro_batch_size=25"], tmp_path
    )
    assert (two[0]["processes"], two[0]["accum"], two[0]["micro"]) == (2, 2, 25)
    for key in ("epoch0_skip0", "epoch1_skip0"):
        seen = [i for rank in two for batch in rank[key] for i in batch]
        assert sorted(seen) == list(range(400))  # every example exactly once across ranks
        # Global batch s = micro-batches (2s, 2s+1) of both ranks = the 1-process batch s, as a set.
        for s, batch in enumerate(one[key]):
            global_batch = [i for m in (2 * s, 2 * s + 1) for rank in two for i in rank[key][m]]
            assert sorted(global_batch) == sorted(batch)
    assert one["epoch0_skip0"] != one["epoch1_skip0"]  # reshuffled every epoch
    assert one["epoch0_skip2"] == one["epoch0_skip0"][2:]  # a resume continues with exactly the next batch
    assert two[1]["epoch0_skip2"] == two[1]["epoch0_skip0"][4:]


def test_three_process_evaluation_equals_single_process(tiny_overrides: list[str], tmp_path: Path) -> None:
    # 150 test examples in chunks of 32: 5 chunks dealt unevenly to 3 processes (2, 2, 1).
    overrides = tiny_overrides + ["train.eval_batch_size=32", "train.batch_size=48"]
    one = probe(1, tmp_path / "e1", "eval", overrides, tmp_path)[0]["eval"]
    three = probe(3, tmp_path / "e3", "eval", overrides, tmp_path)
    for rank in three:
        for term, value in one.items():
            assert rank["eval"][term] == pytest.approx(value, rel=1e-6), term


@pytest.mark.parametrize(
    "recipe",
    [
        [],
        # DReG on the IWAE bound, with the KL weight rising over the first 5 steps
        ["model.objective=iwae", "model.k=3", "model.estimator=dreg", "model.kl_warmup_steps=5"],
        # STL on the ELBO, the paper's tanh network with its output bias from the data
        ["model.estimator=stl", "model.activation=tanh", "model.init_output_bias=true"],
    ],
    ids=["reparam", "dreg-iwae-warmup", "stl-tanh-bias"],
)
def test_topology_invariance(tiny_overrides: list[str], tmp_path: Path, recipe: list[str]) -> None:
    """1 process x micro 100; 2 processes x micro 50; 1 process x micro 50 x 2 accumulation steps:
    the same parameters after the same 8 optimizer steps, to 1e-5 relative (fp32), for each gradient
    estimator and recipe feature."""
    base = tiny_overrides + ["train.batch_size=100", "train.epochs=2", "tracking.log_every_steps=4", *recipe]
    runs = {
        "1x100": (1, ["train.micro_batch_size=100"]),
        "2x50": (2, ["train.micro_batch_size=50"]),
        "1x50x2": (1, ["train.micro_batch_size=50"]),
    }
    weights, elbo = {}, {}
    for name, (nproc, extra) in runs.items():
        run = tmp_path / name
        proc = launch(nproc, ["-m", "vae_dist.cli.train", *base, *extra, f"run.dir={run}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[name] = load_weights(run)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "test"] == [4, 8]
        elbo[name] = [r["elbo"] for r in records]
    for name in ("2x50", "1x50x2"):
        for key, ref in weights["1x100"].items():
            rel = ((weights[name][key] - ref).norm() / ref.norm()).item()
            assert rel < 1e-5, (name, key, rel)
        assert elbo[name] == pytest.approx(elbo["1x100"], rel=1e-5)


def test_cpu_flag_with_several_processes_is_refused(tiny_overrides: list[str], tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "2",
            "-m",
            "vae_dist.cli.train",
            *tiny_overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--multi_gpu --num_processes N" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
