"""The PNG figures of a run: sizes, fixed inputs, determinism, PCA for z > 2. CPU, no data needed.
Run: pytest tests/test_figures.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_digits
from vae_dist import figures
from vae_dist.model import VAE


def tiny_model(z_dim: int = 2) -> VAE:
    torch.manual_seed(0)
    return VAE(hidden_dims=[16], z_dim=z_dim)


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = fake_digits(150, seed=1)
    return images.reshape(-1, 784), labels


def records(steps_per_epoch: int = 8, epochs: int = 3) -> list[dict]:
    """metrics.jsonl as the trainer writes it: train lines every 2 steps, a test line per epoch."""
    out = []
    for step in range(2, steps_per_epoch * epochs + 1, 2):
        elbo = 500 / (1 + step)
        out.append({"split": "train", "epoch": step // steps_per_epoch, "step": step, "elbo": elbo, "kl": 3.0})
        if step % steps_per_epoch == 0:
            out.append({"split": "test", "epoch": step // steps_per_epoch, "step": step, "elbo": elbo + 1, "kl": 3.1})
    return out


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_write_figures_writes_every_png_with_known_pixel_sizes(test_split, tmp_path: Path) -> None:
    images, labels = test_split
    paths = figures.write_figures(tiny_model(), images, labels, records(), tmp_path, seed=0, steps_per_epoch=8)
    assert set(paths) == {"recon", "prior", "manifold", "latent", "loss"}
    assert {p.name for p in paths.values()} == {"recon.png", "prior.png", "manifold.png", "latent.png", "loss.png"}
    tile = 28 + figures.PAD
    # recon: 2 examples x 10 digits = 20, 10 per row, each input row above its reconstruction row.
    assert size(paths["recon"]) == (10 * tile + 2, 4 * tile + 2)
    assert size(paths["prior"]) == (8 * tile + 2, 8 * tile + 2)  # 64 samples
    assert size(paths["manifold"]) == (20 * 28, 20 * 28)  # no padding between manifold tiles
    assert size(paths["latent"]) == (640, 560) and size(paths["loss"]) == (1000, 400)


def test_recon_grid_shows_the_inputs_above_their_reconstructions(test_split, tmp_path: Path) -> None:
    images, _ = test_split
    model = tiny_model()
    path = figures.recon_grid(model, images[:3], tmp_path / "r.png", ncol=3)
    grid = torch.from_numpy(np.asarray(Image.open(path).convert("L")).copy())
    assert grid.shape == (62, 92)
    p = figures.PAD
    for i in range(3):
        tile = grid[p : p + 28, p + i * 30 : p + i * 30 + 28]
        assert torch.equal(tile, images[i].reshape(28, 28))  # row 1: the input, pixel for pixel
    with torch.no_grad():
        recon = torch.sigmoid(model.decode(model.encode(images[:1].float() / 255)[0]))
    expected = (recon * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(28, 28)
    assert (
        grid[30 + p : 30 + p + 28, p : p + 28].int() - expected.int()
    ).abs().max() <= 1  # row 2: sigmoid(decode(mu))


def test_same_seed_draws_the_same_pictures_and_another_seed_does_not(test_split, tmp_path: Path) -> None:
    images, labels = test_split
    model = tiny_model()
    a = figures.write_figures(model, images, labels, records(), tmp_path / "a", seed=3, steps_per_epoch=8)
    b = figures.write_figures(model, images, labels, records(), tmp_path / "b", seed=3, steps_per_epoch=8)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    prior = figures.prior_grid(model, figures.fixed_noise(2, seed=4), tmp_path / "c" / "prior.png")
    recon = figures.recon_grid(model, images[figures.fixed_examples(labels, seed=4)], tmp_path / "c" / "recon.png")
    assert a["prior"].read_bytes() != prior.read_bytes()
    assert a["recon"].read_bytes() != recon.read_bytes()  # other fixed examples


def test_fixed_examples_cover_every_label_and_depend_on_the_seed_only(test_split) -> None:
    _, labels = test_split
    idx = figures.fixed_examples(labels, seed=0)
    assert labels[idx].tolist() == [d for d in range(10) for _ in range(2)]
    assert torch.equal(idx, figures.fixed_examples(labels.clone(), seed=0))
    assert not torch.equal(idx, figures.fixed_examples(labels, seed=1))
    assert torch.equal(figures.fixed_noise(2, 5), figures.fixed_noise(2, 5))
    assert figures.fixed_noise(3, 5, n=7).shape == (7, 3)


def test_figures_restore_the_training_flag_and_keep_no_graph(test_split, tmp_path: Path) -> None:
    images, labels = test_split
    model = tiny_model().train()
    figures.write_figures(model, images, labels, [], tmp_path, seed=0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not (tmp_path / "loss.png").exists()  # no records yet: no loss curves


def test_z_above_2_has_no_manifold_and_projects_means_by_pca(test_split, tmp_path: Path) -> None:
    images, labels = test_split
    paths = figures.write_figures(tiny_model(z_dim=5), images, labels, records(), tmp_path, seed=0)
    assert "manifold" not in paths and not (tmp_path / "manifold.png").exists()
    assert size(paths["latent"]) == (640, 560)
    # Means on a line in 5-D: the first principal component carries all the variance.
    t = torch.linspace(-1, 1, 50).unsqueeze(1)
    points, xlabel, ylabel = figures.project_2d(t * torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5]]))
    assert points.shape == (50, 2) and xlabel.startswith("PC 1 (100%")
    assert torch.allclose(points[:, 1], torch.zeros(50), atol=1e-5)


def test_manifold_grid_puts_z2_up_and_z1_right() -> None:
    z = figures.manifold_z(n=5).reshape(5, 5, 2)
    assert z[0, 0, 0] < z[0, -1, 0] and z[0, 0, 1] > z[-1, 0, 1]
    assert torch.allclose(z[2, 2], torch.zeros(2), atol=1e-6)
    assert abs(float(z[0, -1, 0]) - 1.6449) < 1e-3  # the 95% quantile of N(0, 1)


def test_loss_curves_put_train_and_test_on_the_epoch_axis(tmp_path: Path) -> None:
    assert figures.infer_steps_per_epoch(records(steps_per_epoch=8)) == 8
    assert figures.infer_steps_per_epoch([]) == 1.0
    x, y = figures._curve(records(steps_per_epoch=8), "train", "elbo", 8)
    assert x[:4] == [0.25, 0.5, 0.75, 1.0] and len(x) == len(y) == 12
    x, _ = figures._curve(records(steps_per_epoch=8), "test", "elbo", 8)
    assert x == [1.0, 2.0, 3.0]
    assert size(figures.loss_curves(records(), tmp_path / "loss.png")) == (1000, 400)


def test_a_figure_that_fails_is_a_warning_and_the_others_are_drawn(
    test_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = test_split

    def broken(*args, **kwargs):
        raise RuntimeError("linalg.svd: the algorithm failed to converge")

    monkeypatch.setattr(figures, "latent_scatter", broken)
    with pytest.warns(figures.FigureWarning, match="latent.png was not drawn"):
        paths = figures.write_figures(tiny_model(), images, labels, [], tmp_path, seed=0)
    assert set(paths) == {"recon", "prior", "manifold"}


@pytest.mark.parametrize("background", [False, True])
def test_figure_drawer_draws_the_model_as_it_was_when_submitted(test_split, tmp_path: Path, background: bool) -> None:
    """The drawer a GPU run uses draws in a worker process from a copy of the weights taken at submit,
    so training may change them meanwhile; the PNGs equal an in-place draw of the same weights."""
    images, labels = test_split
    model = tiny_model()
    expected = figures.write_figures(model, images, labels, records(), tmp_path / "direct", seed=0, steps_per_epoch=8)
    drawer = figures.FigureDrawer(images, labels, tmp_path / "drawn", seed=0, steps_per_epoch=8, background=background)
    drawer.submit(model, records(), step=24)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on after the submit
    done = drawer.close()
    assert [(set(paths), step) for paths, step in done] == [(set(expected), 24)]
    for key, path in done[0][0].items():
        if key not in ("latent", "loss"):  # matplotlib PNGs carry no pixel-exact promise across processes
            assert path.read_bytes() == expected[key].read_bytes(), key
        assert path.parent == tmp_path / "drawn"


def test_a_worker_that_fails_is_a_warning(test_split, tmp_path: Path) -> None:
    images, labels = test_split
    drawer = figures.FigureDrawer(images, labels, tmp_path, seed=0, steps_per_epoch=8, background=True)
    drawer.submit(VAE(hidden_dims=[16], z_dim=2), records(), step=8)
    drawer.pending[0] = (drawer.pool.submit(_raise), 8)  # a worker-side failure in place of the draw
    with pytest.warns(figures.FigureWarning, match="the figures of step 8 were not drawn"):
        assert drawer.close() == [({}, 8)]


def _raise() -> None:
    raise RuntimeError("the worker ran out of memory")
