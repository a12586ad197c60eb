"""The sample command: PNG grids with known pixel sizes, the same bytes for the same seed, errors as
sentences. Tiny generated IDX files and an untrained model on the CPU. Run: pytest tests/test_sample.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from vae_dist.cli.sample import main
from vae_dist.model import VAE

TILE = 28 + 2  # a 28-pixel image and the 2-pixel padding before it


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def export(folder: Path, z_dim: int = 2) -> Path:
    torch.manual_seed(0)
    VAE(hidden_dims=[16], z_dim=z_dim).save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return export(tmp_path / "run")


def test_sample_writes_every_grid_with_known_sizes(model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(model_dir), "--out", str(out), "--data-root", str(data_root)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["interpolation.png", "manifold.png", "prior.png", "recon.png"]
    assert size(out / "prior.png") == (8 * TILE + 2, 8 * TILE + 2)  # 64 samples
    assert size(out / "recon.png") == (10 * TILE + 2, 4 * TILE + 2)  # 2 per digit: inputs above reconstructions
    assert size(out / "interpolation.png") == (12 * TILE + 2, 5 * TILE + 2)  # 5 pairs: a, 10 steps, b
    assert size(out / "manifold.png") == (20 * 28, 20 * 28)


def test_options_shape_the_grids(model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(model_dir / "model.safetensors"), "--out", str(out), "--data-root", str(data_root), "--n", "16"]
    args += ["--examples", "0,5,7", "--interpolate", "0", "1", "--interpolate", "2", "3", "--steps", "4", "--grid", "5"]
    assert main(args) == 0
    assert size(out / "prior.png") == (4 * TILE + 2, 4 * TILE + 2)
    assert size(out / "recon.png") == (3 * TILE + 2, 2 * TILE + 2)
    assert size(out / "interpolation.png") == (6 * TILE + 2, 2 * TILE + 2)
    assert size(out / "manifold.png") == (5 * 28, 5 * 28)


def test_the_same_seed_draws_the_same_bytes(model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert (
            main([str(model_dir), "--out", str(tmp_path / name), "--data-root", str(data_root), "--seed", str(seed)])
            == 0
        )
        runs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
    assert runs["a"] == runs["b"]
    assert runs["a"]["prior.png"] != runs["c"]["prior.png"] and runs["a"]["recon.png"] != runs["c"]["recon.png"]


def test_a_checkpoint_directory_with_z_above_2_has_no_manifold(tmp_path: Path, data_root: Path) -> None:
    ckpt = export(tmp_path / "run" / "checkpoints" / "step-8", z_dim=3)
    assert main([str(ckpt), "--data-root", str(data_root)]) == 0
    assert sorted(p.name for p in (ckpt / "samples").iterdir()) == ["interpolation.png", "prior.png", "recon.png"]


def test_no_data_draws_from_the_prior_only(model_dir: Path, tmp_path: Path) -> None:
    assert (
        main([str(model_dir), "--out", str(tmp_path / "out"), "--no-data", "--data-root", str(tmp_path / "nowhere")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifold.png", "prior.png"]


def test_data_root_defaults_to_the_runs_config(model_dir: Path, data_root: Path) -> None:
    (model_dir / "config.yaml").write_text(f"data:\n  root: {data_root}\n")
    assert main([str(model_dir)]) == 0
    assert (model_dir / "samples" / "recon.png").is_file()


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, [], "does not exist; give an exported model"),
        ("empty", [], "holds no model.safetensors or config.json"),
        (
            "model",
            ["--examples", "0,150"],
            "--examples 0,150: the test split has 150 examples, so indices run from 0 to 149",
        ),
        ("model", ["--examples", "a,b"], "give test indices separated by commas"),
        ("model", ["--interpolate", "0", "999"], "--interpolate 0 999: the test split has 150 examples"),
        ("model", ["--steps", "1"], "--steps 1: must be at least 2"),
        ("nodata", [], "pass --data-root DIR"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(make, args, message, tmp_path: Path, data_root: Path, capsys) -> None:
    folder = tmp_path / "model"
    if make == "empty":
        folder.mkdir()
    elif make in ("model", "nodata"):
        export(folder)
    root = tmp_path / "nowhere" if make == "nodata" else data_root
    assert main([str(folder), "--out", str(tmp_path / "out"), "--data-root", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-sample: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # checked before anything is drawn
    if make is None or make == "empty":
        assert str(folder) in err


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_a_pickle_is_refused_whatever_its_name(fmt: str, tmp_path: Path, capsys) -> None:
    """A torch.save file renamed model.safetensors (or any name) is refused as a pickle."""
    folder = export(tmp_path / "model")
    weights = folder / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, weights, _use_new_zipfile_serialization=fmt == "zip")
    other = tmp_path / "weights.ckpt.data"
    other.write_bytes(weights.read_bytes())
    for arg, named in ((folder, weights), (weights, weights), (other, other)):
        assert main([str(arg), "--out", str(tmp_path / "out"), "--no-data"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vae-sample: error: ") and err.count("\n") == 1
        assert str(named) in err and "pickle" in err and "torch.save" in err and "arbitrary code" in err
        assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_name_the_file(tmp_path: Path, capsys) -> None:
    folder = export(tmp_path / "model")
    (folder / "config.json").write_text('{"x_dim": 784, "hidden_dims": [16], "z_dim": 3}')
    assert main([str(folder), "--out", str(tmp_path / "out"), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder / 'model.safetensors'} holds weights of another architecture" in err
    assert "mu.weight: file (2, 16) vs model (3, 16)" in err


@pytest.mark.slow  # a fresh interpreter: ~3 s of imports
def test_runs_as_a_module(model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.sample", str(model_dir), "--out", str(out), "--data-root", str(data_root)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prior" in proc.stdout and (out / "interpolation.png").is_file()
