"""The evaluate command: IWAE estimate of log p(x), exact sharded evaluation, the JSON it writes.
Tiny generated data on the CPU (tests/conftest.py). Run: pytest tests/test_evaluate.py"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, train_in_process
from vae_dist.cli.evaluate import main
from vae_dist.config import DataConfig
from vae_dist.data import load_data
from vae_dist.evaluation import evaluate_elbo, evaluate_iwae, iwae_log_px
from vae_dist.losses import log_weights
from vae_dist.model import VAE

FIELDS = {"elbo", "recon", "kl", "nll_iwae", "k", "n_examples", "binarize", "seconds", "processes"}


def tiny_model(z_dim: int = 3) -> VAE:
    torch.manual_seed(0)
    return VAE(784, [64, 32], z_dim).eval()


def test_iwae_with_one_sample_is_the_single_sample_elbo_on_the_same_noise() -> None:
    # Compared with the sampled form log p(x|z) + log p(z) - log q(z|x), not recon + analytic KL:
    # with k = 1 the estimate is exactly that one log weight, while the analytic-KL ELBO integrates
    # the KL term instead of sampling it; the two agree in expectation, not draw by draw.
    model, x = tiny_model(), torch.rand(16, 784)
    est = iwae_log_px(model, x, k=1, k_batch=1, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(16, 1, 3, generator=torch.Generator().manual_seed(7))
    mu, log_var = model.encode(x)
    z = VAE.reparameterize(mu, log_var, eps)
    elbo = log_weights(model.decode(z), x, z, mu, log_var)[:, 0]
    torch.testing.assert_close(est, elbo.double(), rtol=1e-6, atol=0)
    # Blocks of k_batch samples accumulated by log-add-exp equal one log-mean-exp over all k.
    est = iwae_log_px(model, x, k=7, k_batch=3, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps = torch.cat([torch.randn(16, kc, 3, generator=g) for kc in (3, 3, 1)], dim=1)
    z = VAE.reparameterize(mu, log_var, eps)
    lw = log_weights(model.decode(z), x, z, mu, log_var).double()
    torch.testing.assert_close(est, torch.logsumexp(lw, 1) - math.log(7), rtol=1e-6, atol=0)


def test_estimate_tightens_with_k_on_a_fixed_model(tiny_overrides: list[str], data_root: Path) -> None:
    trainer, _ = train_in_process(tiny_overrides)  # trained: q(z|x) is informative, so k matters
    model, acc = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator
    _, test = load_data(DataConfig(root=str(data_root), download=False))
    elbo = evaluate_elbo(model, test.images, acc, seed=0, batch_size=64)["elbo"]
    nll = [evaluate_iwae(model, test.images, acc, seed=0, k=k, batch_size=64)["nll_iwae"] for k in (1, 10, 100, 1000)]
    assert all(a >= b for a, b in zip(nll, nll[1:])), nll  # -log p(x) estimate weakly falls as k grows
    assert nll[-1] < elbo and math.isclose(nll[0], elbo, rel_tol=0.02)  # k = 1: the ELBO up to noise


def test_cli_writes_json_and_matches_the_trainer(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    _, summary = train_in_process(tiny_overrides)
    run = tmp_path / "run"
    assert main([str(run), "--k", "20", "--batch-size", "64"]) == 0  # data options from run/config.yaml
    result = json.loads((run / "eval.json").read_text())
    assert FIELDS <= result.keys()
    assert (result["k"], result["n_examples"], result["binarize"], result["processes"]) == (20, 150, "none", 1)
    # Same seed and chunks as the trainer's evaluation: the same test elbo, to rounding.
    assert math.isclose(result["elbo"], summary["final_test_elbo"], rel_tol=1e-6)
    assert math.isclose(result["elbo"], result["recon"] + result["kl"], rel_tol=1e-6)
    assert result["nll_iwae"] < result["elbo"]
    out = capsys.readouterr().out
    assert "nll_iwae" in out and str(run / "eval.json") in out


def test_binarized_test_set_is_fixed_unless_a_seed_redraws_it(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Default: the fixed binarization every run sees (data.BINARIZE_SEED), the same number twice; the
    trainer of a dynamic run evaluates on it too. --binarize-seed draws another binary test set."""
    from vae_dist.data import BINARIZE_SEED

    _, summary = train_in_process(tiny_overrides + ["data.binarize=dynamic"])
    run = tmp_path / "run"
    common = [str(run), "--k", "5", "--batch-size", "64"]
    results = []
    for i, extra in enumerate(([], [], ["--binarize-seed", "7"], ["--binarize-seed", str(BINARIZE_SEED)])):
        assert main([*common, *extra, "--out", str(tmp_path / f"e{i}.json")]) == 0
        results.append(json.loads((tmp_path / f"e{i}.json").read_text()))
    fixed, again, other, same_seed = results
    assert fixed["binarize"] == "dynamic" and fixed["binarize_seed"] == BINARIZE_SEED
    assert (fixed["elbo"], fixed["nll_iwae"]) == (again["elbo"], again["nll_iwae"])
    assert math.isclose(fixed["elbo"], summary["final_test_elbo"], rel_tol=1e-6)
    assert other["binarize_seed"] == 7 and other["elbo"] != fixed["elbo"]
    assert (same_seed["elbo"], same_seed["nll_iwae"]) == (fixed["elbo"], fixed["nll_iwae"])  # the same draw
    err = io.StringIO()  # not capsys: the trainer's end needs a stderr with a file descriptor
    with contextlib.redirect_stderr(err):
        assert main([*common, "--binarize", "none", "--binarize-seed", "7"]) == 2
    assert "--binarize-seed re-binarizes the test split" in err.getvalue()


def test_bad_model_paths_exit_2_with_a_sentence(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "model.safetensors" in err and "config.json" in err
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04N.")
    assert main([str(pickle)]) == 2
    assert "pickle" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"), [(["--k", "0"], "--k=0"), (["--batch-size", "-1", "--k-batch", "0"], "--batch-size=-1")]
)
def test_bad_numbers_are_one_line_without_the_usage_block(tmp_path: Path, capsys, args, message: str) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vae-evaluate: error: {message}: must be an integer >= 1.") and err.count("\n") == 1
    assert "usage" not in err


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_a_pickle_named_model_safetensors_is_refused(tmp_path: Path, capsys, fmt: str) -> None:
    """A pickle is recognised by content, before any data is read, whether given as a folder or a file."""
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, weights, _use_new_zipfile_serialization=fmt == "zip")
    for arg in (model_dir, weights):
        assert main([str(arg), "--data-root", str(tmp_path / "nowhere")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vae-evaluate: error: ") and err.count("\n") == 1
        assert str(weights) in err and "pickle" in err and "torch.save" in err and "arbitrary code" in err


def test_unloadable_weights_exit_2_naming_the_file(tmp_path: Path, data_root: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    assert main([str(model_dir), "--data-root", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} is not a readable safetensors file" in err
    weights.write_bytes(blob)
    (model_dir / "config.json").write_text(json.dumps({"x_dim": 784, "hidden_dims": [64, 32], "z_dim": 4}))
    assert main([str(model_dir), "--data-root", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} holds weights of another architecture" in err
    assert "mu.weight: file (3, 32) vs model (4, 32)" in err


def test_a_damaged_model_without_a_config_is_named_before_the_data_is_looked_for(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """No config.yaml beside it and no --data-root: the damaged weights are the problem to report, not
    the MNIST download that the default data.root would otherwise try."""
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main([str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} is not a readable safetensors file" in err
    assert not (tmp_path / "data").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_three_processes_equal_one(data_root: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny_model(z_dim=2).save_pretrained(model_dir)
    # 150 examples in chunks of 32: 5 chunks dealt 2, 2, 1; 50 samples in blocks of 16, 16, 16, 2.
    args = [str(model_dir), "--data-root", str(data_root), "--k", "50", "--batch-size", "32", "--k-batch", "16"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3"]
    launch += ["--main_process_port", str(free_port()), "-m", "vae_dist.cli.evaluate"]
    proc = subprocess.run(
        [*launch, *args, "--out", str(tmp_path / "three.json")], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    three = json.loads((tmp_path / "three.json").read_text())
    assert (one["processes"], three["processes"], three["n_examples"]) == (1, 3, 150)
    for key in ("elbo", "recon", "kl", "nll_iwae"):
        assert math.isclose(one[key], three[key], rel_tol=1e-6), (key, one[key], three[key])
