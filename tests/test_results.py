"""`vae-results`: groups, means and standard deviations, unfinished runs, paths that are not runs.
Run: pytest tests/test_results.py  (no training: the run folders are written by the tests)"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vae_dist.cli.results import main
from vae_dist.config import load_config
from vae_dist.metrics_file import MetricsFile


def fake_run(
    folder: Path, seed: int, test_elbos: list[float], *overrides: str, finished: bool = True, rate: float = 1000.0
) -> Path:
    """A run.dir as vae-train leaves it: config.yaml, metrics.jsonl (train and test lines per epoch), and
    model.safetensors when it finished."""
    epochs = 3
    cfg = load_config(None, [f"run.dir={folder}", f"train.seed={seed}", f"train.epochs={epochs}", *overrides])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    metrics = MetricsFile(folder / "metrics.jsonl")
    for epoch, elbo in enumerate(test_elbos, 1):
        step = epoch * 600
        metrics.write({"split": "train", "epoch": epoch - 1, "step": step, "elbo": elbo + 2, "examples_per_s": rate})
        metrics.write(
            {"split": "test", "epoch": epoch, "step": step, "loss": elbo, "elbo": elbo, "recon": elbo - 5, "kl": 5.0}
        )
    if finished:
        assert len(test_elbos) == epochs
        (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def results(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runs_that_differ_only_in_seed_are_one_row_and_two_configs_two_rows(tmp_path: Path, capsys) -> None:
    finals_a = [138.4, 137.9, 139.1]
    for seed, final in enumerate(finals_a):
        fake_run(tmp_path / "a" / f"seed-{seed}", seed, [150.0, final - 0.5, final], rate=1000.0 + 100 * seed)
    # A run written before a config key existed (its default keeps the old behaviour) is the same experiment.
    older = tmp_path / "a" / "seed-2" / "config.yaml"
    older.write_text("".join(line for line in older.read_text().splitlines(True) if "eps:" not in line))
    for seed, final in enumerate([137.0, 137.6]):
        fake_run(tmp_path / "b" / f"seed-{seed}", seed, [149.0, final, final + 0.1], "optim.lr=0.002")
    code, out, err = results(capsys, str(tmp_path / "a"), str(tmp_path / "b" / "seed-*"), "--json")
    assert code == 0, err
    rows = json.loads(out)["groups"]
    assert [r["n"] for r in rows] == [3, 2]  # never averaged across the two learning rates
    a, b = rows
    assert a["seeds"] == [0, 1, 2] and a["differs_in"] == {"optim.lr": 0.001} and b["differs_in"] == {"optim.lr": 0.002}
    assert a["final_elbo"]["mean"] == pytest.approx(statistics.fmean(finals_a))
    assert a["final_elbo"]["std"] == pytest.approx(statistics.stdev(finals_a))  # sample std (n - 1)
    assert (a["final_elbo"]["min"], a["final_elbo"]["max"]) == (137.9, 139.1)
    assert a["best_elbo"]["mean"] == pytest.approx(statistics.fmean([f - 0.5 for f in finals_a]))
    assert b["best_elbo"]["mean"] == pytest.approx(137.3)
    assert a["examples_per_s"]["mean"] == pytest.approx(1100.0)
    assert a["runs"] == f"{tmp_path / 'a'}/seed-{{0,1,2}}"

    code, out, _ = results(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| runs | n | final test −ELBO")
    assert "| 3 | 138.47 ± 0.60 [137.90, 139.10] |" in lines[2] and "optim.lr=0.001" in lines[2]
    assert "| 2 |" in lines[3] and "optim.lr=0.002" in lines[3]


def test_an_unfinished_run_is_listed_apart_with_why(tmp_path: Path, capsys) -> None:
    for seed in (0, 1):
        fake_run(tmp_path / f"seed-{seed}", seed, [150.0, 140.0, 138.0 + seed])
    stopped = fake_run(tmp_path / "seed-2", 2, [150.0, 139.0], finished=False)
    (stopped / "checkpoints" / "step-00001200").mkdir(parents=True)
    code, out, err = results(capsys, str(tmp_path), "--json")
    report = json.loads(out)
    assert code == 0, err
    assert report["groups"][0]["n"] == 2 and report["groups"][0]["final_elbo"]["mean"] == pytest.approx(138.5)
    [unfinished] = report["unfinished"]
    assert unfinished["path"] == str(stopped)
    assert "stopped at step 1200, epoch 2 of 3" in unfinished["why"] and "step-00001200" in unfinished["why"]
    assert "resume" in unfinished["why"]

    code, out, err = results(capsys, str(stopped))  # nothing finished: the list, and exit 1
    assert code == 1 and "Not finished" in out and str(stopped) in out and "no run among the paths" in err


def test_a_folder_that_is_not_a_run_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run\n")
    for path in (tmp_path / "notes", tmp_path / "notes" / "todo.txt", tmp_path / "missing-*"):
        proc = subprocess.run(
            [sys.executable, "-m", "vae_dist.cli.results", str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vae-results: error: ") and "run" in lines[0], proc.stderr
    assert (
        "is not a run"
        in subprocess.run(
            [sys.executable, "-m", "vae_dist.cli.results", str(tmp_path / "notes")], capture_output=True, text=True
        ).stderr
    )


def test_a_torn_last_line_is_dropped_and_said(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "seed-0", 0, [150.0, 140.0, 138.25])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "epoch": 3, "step": 18')  # the process died in the middle of a write
    code, out, err = results(capsys, str(run), "--json")
    report = json.loads(out)
    assert code == 0, err
    assert report["groups"][0]["final_elbo"]["mean"] == 138.25
    assert report["notes"] == [
        f"{run / 'metrics.jsonl'}: dropped a torn last line (the run was killed while writing it)"
    ]
    # Damage anywhere but at the end is not a torn write: the run is listed apart, naming the line.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:-1]]) + "\n")
    code, out, _ = results(capsys, str(run), "--json")
    assert code == 1 and "line 2 is not JSON" in json.loads(out)["unfinished"][0]["why"]


def test_original_script_output_beside_the_toolkit_with_the_difference_and_its_se(tmp_path: Path, capsys) -> None:
    toolkit = [138.6, 137.9, 139.0]
    for seed, final in enumerate(toolkit):
        fake_run(tmp_path / "toolkit" / f"seed-{seed}", seed, [150.0, 140.0, final])
    original = [137.5, 138.1, 137.2]
    folder = tmp_path / "original"
    folder.mkdir()
    for seed, final in enumerate(original):
        lines = [
            {"epoch": e, "train_s": 4.0, "samples_per_s": 15000.0, "train_loss": 150.0, "test_loss": t}
            for e, t in enumerate([150.0, 139.0, final], 1)
        ]
        (folder / f"seed-{seed}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "seed-3.jsonl").write_text(json.dumps(lines[0]) + "\n")  # still running: 1 epoch of 3
    code, out, err = results(
        capsys, str(tmp_path / "toolkit"), str(folder / "*.jsonl"), "--compare", "--processor", "Test CPU", "--json"
    )
    report = json.loads(out)
    assert code == 0, err
    mine, theirs = report["groups"]
    assert theirs["kind"] == "original script" and theirs["n"] == 3 and theirs["seeds"] == [0, 1, 2]
    assert theirs["runs"] == f"{folder}/seed-{{0,1,2}}.jsonl"
    assert mine["differs_in"] == {}  # the original script has no config to set the toolkit's row apart from
    assert theirs["processor"] == ["Test CPU"] and theirs["examples_per_s"]["mean"] == pytest.approx(15000.0)
    assert report["unfinished"][0]["why"].startswith("1 of 3 epochs")
    [final] = [c for c in report["compare"] if c["measure"] == "final_elbo"]
    se = math.sqrt(statistics.variance(toolkit) / 3 + statistics.variance(original) / 3)
    assert final["difference"] == pytest.approx(statistics.fmean(original) - statistics.fmean(toolkit))
    assert final["se"] == pytest.approx(se)


def test_metrics_file_raises_on_a_damaged_line_that_is_not_the_last(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        MetricsFile(path).read()
    path.write_text('{"step": 1}\n{"step": 2')
    assert MetricsFile(path).read_checked() == ([{"step": 1}], '{"step": 2')


def test_plot_draws_each_rows_curve_and_the_nlls_of_run_and_checkpoint_folders(tmp_path: Path, capsys) -> None:
    for seed, final in enumerate([90.2, 90.6]):
        run = fake_run(tmp_path / "vae" / f"seed-{seed}", seed, [100.0, 92.0 + seed, final])
        (run / "eval.json").write_text(json.dumps({"nll_iwae": final - 3.0, "k": 5000}))
        # vae-evaluate on a checkpoint folder writes its eval.json there: step 600 is epoch 1
        (run / "checkpoints" / "step-00000600").mkdir(parents=True)
        (run / "checkpoints" / "step-00000600" / "eval.json").write_text(
            json.dumps({"nll_iwae": 96.0 + seed, "k": 500})
        )
    running = fake_run(tmp_path / "iwae", 0, [110.0, 105.0], "model.objective=iwae", "model.k=50", finished=False)
    png = tmp_path / "curves.png"
    code, _, err = results(
        capsys, str(tmp_path / "vae"), str(running), "--plot", str(png), "--mark", "Burda et al. 2016, VAE=86.76"
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert f"wrote {png}" in err

    from vae_dist.run_folders import read_runs

    first, _, iwae = read_runs([tmp_path / "vae" / "seed-0", tmp_path / "vae" / "seed-1", running])
    assert first.curve == [(1.0, 100.0), (2.0, 92.0), (3.0, 90.2)]
    assert first.nll_points == [(1.0, 96.0, 500), (3.0, pytest.approx(87.2), 5000)]
    assert iwae.curve_label == "test −IWAE bound (k = 50)" and iwae.curve == [(1.0, 110.0), (2.0, 105.0)]


def test_mean_band_averages_the_epochs_every_seed_has() -> None:
    from vae_dist.plots import _mean_band

    xs, mean, lo, hi = _mean_band([[(1, 10.0), (2, 8.0), (3, 7.0)], [(1, 12.0), (2, 6.0)]])
    assert (xs, mean, lo, hi) == ([1, 2], [11.0, 7.0], [10.0, 6.0], [12.0, 8.0])


@pytest.mark.parametrize("mark", ["paper", "paper=high", "=86.76"])
def test_a_malformed_mark_is_one_sentence_and_exit_2(tmp_path: Path, capsys, mark: str) -> None:
    fake_run(tmp_path / "seed-0", 0, [150.0, 140.0, 138.0])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "seed-0"), "--plot", str(tmp_path / "c.png"), "--mark", mark])
    assert exit_info.value.code == 2
    assert "--mark" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path: Path) -> None:
    """`vae-results runs/ | head`: the reader closes the pipe before the table is written; the command
    ends with 141 (128 + SIGPIPE, as a shell shows for tools the signal ends) and no traceback."""
    import os

    for seed in range(2):
        fake_run(tmp_path / "runs" / f"seed-{seed}", seed, [100.0, 95.0, 90.0 + seed])
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.results", str(tmp_path / "runs")],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_compare_says_when_a_row_has_one_run(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "a" / "seed-0", 0, [100.0, 95.0, 90.0])
    fake_run(tmp_path / "b" / "seed-0", 0, [100.0, 95.0, 91.0], "model.z_dim=3")
    code, out, err = results(capsys, str(tmp_path / "a"), str(tmp_path / "b"), "--compare")
    assert code == 0
    assert "has one run" in err or "have one run" in err
    assert "add seeds to compare" in err


def test_plot_of_runs_shorter_than_an_epoch_is_refused_and_one_epoch_is_drawn(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short"
    short.mkdir()
    cfg = load_config(None, [f"run.dir={short}", "train.max_steps=20"])
    (short / "config.yaml").write_text(cfg.to_yaml())
    MetricsFile(short / "metrics.jsonl").write({"split": "test", "epoch": 0, "step": 20, "loss": 150.0, "elbo": 150.0})
    png = tmp_path / "short.png"
    code, _, err = results(capsys, str(short), "--plot", str(png))
    assert code == 2 and "nothing to draw, no run given has finished an epoch" in err
    assert not png.exists()
    one = fake_run(tmp_path / "one", 0, [120.0], finished=False)
    code, _, err = results(capsys, str(one), "--plot", str(png))
    assert code == 1 and png.is_file()  # 1: no finished run to average; the unfinished one is drawn
