"""The figures of a run: the PNGs it writes to its directory (and the tracker uploads) each image
epoch, from which inputs, and where they are drawn.

`write_figures` draws them all; `FigureDrawer` calls it for the trainer, in place or in a worker
process while training goes on. The pictures themselves are grids.py (image grids) and plots.py
(matplotlib); the ones a program draws on its own (vae-sample) are importable from here too, so
`from vae_dist import figures` is the one import it needs.

The same inputs every time: `fixed_examples` and `fixed_noise` derive from `seed` alone, so the
reconstructions of epoch 1 and epoch 40 show the same digits, and the prior samples the same z.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from vae_dist.grids import PAD as PAD  # each `name as name`: re-exported for vae-sample and the tests
from vae_dist.grids import interpolation_grid as interpolation_grid
from vae_dist.grids import latent_manifold, prior_grid, recon_grid
from vae_dist.grids import manifold_z as manifold_z
from vae_dist.plots import _curve as _curve
from vae_dist.plots import infer_steps_per_epoch, latent_scatter, loss_curves
from vae_dist.plots import project_2d as project_2d
from vae_dist.streams import FIGURE_EXAMPLES, FIGURE_NOISE

PER_CLASS = 2  # fixed test examples per digit in the reconstruction grid
N_PRIOR = 64  # prior samples in prior.png: an 8 x 8 grid


class FigureWarning(UserWarning):
    """A figure could not be drawn; the others were, and training goes on."""


# ------------------------------------------------------------------ fixed inputs
def fixed_examples(labels: torch.Tensor, seed: int, per_class: int = PER_CLASS) -> torch.Tensor:
    """Indices of `per_class` test examples of each label, ordered by label, drawn from `seed` alone.

    Labels with fewer examples contribute what they have. Without labels (None or empty) this
    falls back to 10 x per_class seeded indices."""
    g = torch.Generator().manual_seed(seed + FIGURE_EXAMPLES)
    labels = labels.cpu()
    order = torch.randperm(len(labels), generator=g)
    picked = []
    for y in sorted(set(labels.tolist())):
        picked.append(order[labels[order] == y][:per_class])
    return torch.cat(picked) if picked else order[: 10 * per_class]


def fixed_noise(z_dim: int, seed: int, n: int = N_PRIOR) -> torch.Tensor:
    """n draws of z ~ N(0, I) from `seed` alone: the prior samples of every image epoch."""
    g = torch.Generator().manual_seed(seed + FIGURE_NOISE)
    return torch.randn(n, z_dim, generator=g)


# ------------------------------------------------------------------ one call per image epoch
def write_figures(
    model: torch.nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    records: list[dict[str, Any]],
    out_dir: Path,
    *,
    seed: int,
    steps_per_epoch: float | None = None,
) -> dict[str, Path]:
    """Write recon.png, prior.png, latent.png, loss.png and, for z = 2, manifold.png into `out_dir`
    (overwritten each call); returns {"recon": path, ...}. `records` are metrics.jsonl dicts; with
    none, loss.png is skipped. Examples and noise come from `seed` only, so every call draws the same.

    A figure that cannot be drawn (a diverged model's NaN means, a full disk) is left out with one
    FigureWarning: pictures never stop a training run."""
    out_dir = Path(out_dir)
    spe = steps_per_epoch or infer_steps_per_epoch(records)
    tests = [r for r in records if r.get("split") == "test" and "step" in r]
    when = f"epoch {tests[-1]['step'] / spe:g}" if tests else ""
    idx = fixed_examples(test_labels, seed).to(test_images.device)
    jobs = {
        "recon": lambda: recon_grid(model, test_images[idx], out_dir / "recon.png"),
        "prior": lambda: prior_grid(model, fixed_noise(model.z_dim, seed), out_dir / "prior.png"),
        "manifold": lambda: latent_manifold(model, out_dir / "manifold.png"),
        "latent": lambda: latent_scatter(model, test_images, test_labels, out_dir / "latent.png", title=when),
        "loss": lambda: loss_curves(records, out_dir / "loss.png", spe) if records else None,
    }
    paths = {}
    for key, job in jobs.items():
        try:
            path = job()
        except Exception as err:  # any failure of one picture: warn, draw the others
            warnings.warn(f"{key}.png was not drawn ({type(err).__name__}: {err}).", FigureWarning, stacklevel=2)
            continue
        if path is not None:
            paths[key] = path
    return paths


# ------------------------------------------------------------------ drawing while training goes on
_WORKER: dict[str, Any] = {}  # the test split, held by a background worker process


def _start_worker(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Initialiser of the worker process: stop signals are for the training process (which waits
    for the drawing in progress), and the worker dies with its parent, whatever kills that."""
    import signal

    from vae_dist.signals import STOP_SIGNALS, die_with_parent

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    torch.set_num_threads(2)  # leave the host's other cores to the training processes
    _WORKER.update(images=images, labels=labels)


def _draw(config: dict, state: dict, records: list, out_dir: Path, seed: int, spe: float) -> tuple[dict, list]:
    """In the worker: rebuild the model from its config and weights, draw, return (paths, warnings)."""
    from vae_dist.model import VAE

    model = VAE(**config)
    model.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FigureWarning)
        paths = write_figures(
            model, _WORKER["images"], _WORKER["labels"], records, out_dir, seed=seed, steps_per_epoch=spe
        )
    return paths, [str(w.message) for w in caught]


class FigureDrawer:
    """`write_figures` for the trainer's main process: in place, or in a worker process meanwhile.

    A draw costs about a second of CPU (matplotlib, PNG encoding, decoding on the CPU). On a GPU that
    second would stall the device, so a worker process (spawned, so it never shares CUDA state)
    draws from a CPU copy of the weights while training goes on; a thread would not do, since the
    drawing holds Python's GIL that the training loop needs between replays. On a CPU run the worker
    would take the training's own cores, so the figures are drawn in place. `collect` returns the
    draws that have finished, as (paths, step at submit), in order, for the tracker."""

    def __init__(
        self,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        out_dir: Path,
        *,
        seed: int,
        steps_per_epoch: float,
        background: bool,
    ):
        self.images, self.labels = test_images, test_labels.cpu()
        self.out_dir, self.seed, self.spe = Path(out_dir), seed, steps_per_epoch
        self.pool = None
        self.pending: list[tuple[Any, int]] = []  # (future or finished result, step)
        if background:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(test_images.cpu(), self.labels),
            )
            self.pool.submit(int)  # start the worker now: its imports overlap the first epochs

    def submit(self, model: torch.nn.Module, records: list[dict[str, Any]], step: int) -> None:
        """Draw the figures of `model` (as it is now) and `records`, labelled with optimizer step `step`."""
        if self.pool is None:
            paths = write_figures(
                model, self.images, self.labels, records, self.out_dir, seed=self.seed, steps_per_epoch=self.spe
            )
            self.pending.append(((paths, []), step))
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        future = self.pool.submit(_draw, model.config_dict, state, records, self.out_dir, self.seed, self.spe)
        self.pending.append((future, step))

    def collect(self, wait: bool = False) -> list[tuple[dict[str, Path], int]]:
        """The finished draws, oldest first (all of them with `wait`); a worker failure is a warning."""
        done = []
        while self.pending:
            job, step = self.pending[0]
            if not isinstance(job, tuple):
                if not (wait or job.done()):
                    break
                try:
                    job = job.result()
                except Exception as err:  # the worker died or raised: pictures never stop training
                    job = ({}, [f"the figures of step {step} were not drawn ({type(err).__name__}: {err})."])
            self.pending.pop(0)
            paths, problems = job
            for message in problems:
                warnings.warn(message, FigureWarning, stacklevel=2)
            done.append((paths, step))
        return done

    def close(self) -> list[tuple[dict[str, Path], int]]:
        """Wait for every draw, stop the worker; returns the draws that had not been collected."""
        done = self.collect(wait=True)
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        return done
