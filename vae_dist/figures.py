"""Pictures of a VAE: the PNGs a run writes to its directory (and the tracker uploads) each image epoch.

Every function takes a model, tensors and a path, writes one PNG and returns the path. The model is
read in eval mode without gradients; its training flag is restored afterwards. The decoder returns
Bernoulli logits, and this module is the one place that applies the sigmoid, to show p(x|z) as
grey levels.

Image grids (reconstructions, prior samples, manifold, interpolations) are written pixel for pixel
with torchvision's `save_image`: one 28 x 28 tile per image, so the same pixels give the same bytes.
Plots (latent scatter, loss curves) use matplotlib's object API on the Agg canvas: no pyplot, no
global backend switch, safe on a headless node.

The same inputs every time: `fixed_examples` and `fixed_noise` derive from `seed` alone, so the
reconstructions of epoch 1 and epoch 40 show the same digits, and the prior samples the same z.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_dist.streams import FIGURE_EXAMPLES, FIGURE_NOISE

SIDE = 28  # MNIST-family images are 28 x 28
PER_CLASS = 2  # fixed test examples per digit in the reconstruction grid
N_PRIOR = 64  # prior samples in prior.png: an 8 x 8 grid
MANIFOLD_N = 20  # manifold.png is MANIFOLD_N x MANIFOLD_N decoder outputs
MANIFOLD_P = (0.05, 0.95)  # z grid spans these N(0, 1) quantiles (about +-1.64), Kingma & Welling 2014, fig. 4
PAD = 2  # pixels between tiles
PAD_VALUE = 0.5  # grey lines between tiles, so black digit backgrounds stay apart
SCATTER_MAX = 5_000  # test means drawn in latent.png: the first 5000 test examples (half the CPU cost of all 10,000)


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


# ------------------------------------------------------------------ model helpers
class _Eval:
    """Eval mode and no grad for the block; the model's training flag is restored on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> torch.device:
        self.model.eval()
        self.no_grad.__enter__()
        return next(self.model.parameters()).device

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 0..255 (or float 0..1) [N, 784] -> float32 [N, 784] in [0, 1] on `device`."""
    x = images.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _tiles(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 784] in [0, 1] -> [N, 1, 28, 28] on the CPU, for make_grid."""
    return pixels.detach().float().cpu().reshape(-1, 1, SIDE, SIDE)


def decode_pixels(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """p(x|z) per pixel, [N, 784] in [0, 1]: the sigmoid of the decoder's logits (caller holds no_grad)."""
    return torch.sigmoid(model.decode(z.float()).float())


def encode_means(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Means of q(z|x), [N, z_dim] on the CPU, in chunks of `batch_size` examples."""
    with _Eval(model) as device:
        return torch.cat(
            [
                model.encode(_unit(images[i : i + batch_size], device))[0].cpu()
                for i in range(0, len(images), batch_size)
            ]
        )


def _save(tiles: torch.Tensor, path: Path, nrow: int, padding: int = PAD) -> Path:
    from torchvision.utils import save_image  # here, not at import: ~1.5 s of a run's start-up

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, path, nrow=nrow, padding=padding, pad_value=PAD_VALUE)
    return path


# ------------------------------------------------------------------ image grids
def recon_grid(model: torch.nn.Module, x_uint8: torch.Tensor, path: Path, ncol: int = 10) -> Path:
    """Test inputs above their reconstructions: rows alternate input / sigmoid(decode(mu)), ncol per row.

    Reconstructions decode the mean of q(z|x), so the picture has no sampling noise."""
    with _Eval(model) as device:
        x = _unit(x_uint8, device)
        recon = decode_pixels(model, model.encode(x)[0])
    x, recon = _tiles(x), _tiles(recon)
    rows = []
    for i in range(0, len(x), ncol):
        a, b = x[i : i + ncol], recon[i : i + ncol]
        if len(a) < ncol:  # keep the columns aligned: pad a short last row with blank tiles
            blank = torch.zeros(ncol - len(a), 1, SIDE, SIDE)
            a, b = torch.cat([a, blank]), torch.cat([b, blank])
        rows += [a, b]
    return _save(torch.cat(rows), path, nrow=ncol)


def prior_grid(model: torch.nn.Module, z_fixed: torch.Tensor, path: Path) -> Path:
    """Decoder outputs for fixed prior draws z ~ N(0, I), in a square-ish grid."""
    with _Eval(model) as device:
        pixels = decode_pixels(model, z_fixed.to(device))
    return _save(_tiles(pixels), path, nrow=math.ceil(math.sqrt(len(z_fixed))))


def manifold_z(n: int = MANIFOLD_N) -> torch.Tensor:
    """[n*n, 2] z on a grid of N(0, 1) quantiles; row-major, z1 rising to the right, z2 rising upwards."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(*MANIFOLD_P, n))
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")  # top row = largest z2
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


def latent_manifold(model: torch.nn.Module, path: Path, n: int = MANIFOLD_N) -> Path | None:
    """For z = 2: an n x n grid of decoder outputs over the z plane (Kingma & Welling 2014, fig. 4).

    Returns None (and writes nothing) for other latent sizes."""
    if model.z_dim != 2:
        return None
    with _Eval(model) as device:
        pixels = decode_pixels(model, manifold_z(n).to(device))
    return _save(_tiles(pixels), path, nrow=n, padding=0)


def interpolation_grid(
    model: torch.nn.Module, x_from: torch.Tensor, x_to: torch.Tensor, path: Path, steps: int = 10
) -> Path:
    """One row per pair: input a, decode of `steps` points on the line from mu(a) to mu(b), input b."""
    with _Eval(model) as device:
        a, b = _unit(x_from, device), _unit(x_to, device)
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
        z = mu_a.unsqueeze(1) * (1 - t) + mu_b.unsqueeze(1) * t  # [pairs, steps, z]
        pixels = decode_pixels(model, z.reshape(-1, z.shape[-1])).reshape(len(a), steps, -1)
    rows = torch.cat([a.unsqueeze(1), pixels, b.unsqueeze(1)], dim=1)  # [pairs, steps + 2, 784]
    return _save(_tiles(rows.reshape(-1, rows.shape[-1])), path, nrow=steps + 2)


# ------------------------------------------------------------------ matplotlib plots
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.3 s to import

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _savefig(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version string: same figure, same bytes
    return path


def project_2d(means: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """(points [N, 2], x label, y label). z = 2 as is; z > 2 onto the first two principal components
    (SVD of the centred means); z = 1 against zero."""
    z = means.shape[1]
    if z == 2:
        return means, "$z_1$", "$z_2$"
    if z == 1:
        return torch.cat([means, torch.zeros_like(means)], 1), "$z_1$", ""
    centred = means - means.mean(0)
    _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    share = (s**2 / (s**2).sum()).tolist()
    points = (centred.double() @ vh[:2].T).float()
    return points, f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)"


def latent_scatter(
    model: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, path: Path, title: str = ""
) -> Path:
    """Means of q(z|x) of test examples, coloured by label. z > 2: PCA to 2-D, said in the title."""
    images_uint8, labels = images_uint8[:SCATTER_MAX], labels[:SCATTER_MAX].cpu()
    means = encode_means(model, images_uint8)
    points, xlabel, ylabel = project_2d(means)
    kind = "q(z|x) means" if means.shape[1] <= 2 else f"PCA of the {means.shape[1]}-D q(z|x) means"
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    sc = ax.scatter(
        points[:, 0].numpy(),
        points[:, 1].numpy(),
        c=labels.numpy(),
        cmap="tab10",
        vmin=-0.5,
        vmax=9.5,
        s=3,
        alpha=0.7,
        linewidths=0,
        rasterized=True,
    )
    fig.colorbar(sc, ax=ax, ticks=range(10), label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{kind} of {len(labels)} test examples" + (f", {title}" if title else ""))
    return _savefig(fig, path)


def _curve(records: list[dict[str, Any]], split: str, key: str, steps_per_epoch: float) -> tuple[list, list]:
    points = [
        (r["step"] / steps_per_epoch, r[key])
        for r in records
        if r.get("split") == split and r.get(key) is not None and "step" in r
    ]
    return [p[0] for p in points], [p[1] for p in points]


def infer_steps_per_epoch(records: list[dict[str, Any]]) -> float:
    """Optimizer steps per epoch from test records (logged at step = epoch x steps per epoch); 1 if unknown."""
    for r in records:
        if r.get("split") == "test" and r.get("epoch", 0) > 0 and r.get("step", 0) > 0:
            return r["step"] / r["epoch"]
    return 1.0


def loss_curves(records: list[dict[str, Any]], path: Path, steps_per_epoch: float | None = None) -> Path:
    """Train and test -ELBO (left) and KL (right) against epochs, from metrics.jsonl records.

    The x axis is step / steps_per_epoch for both splits: train lines average the steps since the
    previous line, test lines sit at the end of each epoch (or where max_steps stopped)."""
    spe = steps_per_epoch or infer_steps_per_epoch(records)
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    for ax, key, label in ((left, "elbo", "−ELBO"), (right, "kl", "KL(q(z|x) ‖ p(z))")):
        tx, ty = _curve(records, "train", key, spe)
        vx, vy = _curve(records, "test", key, spe)
        ax.plot(tx, ty, color="tab:blue", lw=1, alpha=0.8, label="train (running mean)")
        ax.plot(vx, vy, color="tab:orange", lw=1.5, marker="o", ms=3, label="test")
        if key == "elbo" and vy:
            # The first train lines (~540 nats at step 0) would flatten the interesting part.
            later = [y for x, y in zip(tx, ty) if x >= 1] + vy
            lo, hi = min(later + ty), max(later)
            ax.set_ylim(lo - 0.05 * (hi - lo) - 0.5, hi + 0.1 * (hi - lo) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label} (nats per example)")
        ax.grid(alpha=0.3)
        ax.legend()
    vx, vy = _curve(records, "test", "elbo", spe)
    left.set_title("−ELBO, lower is better" + (f": test {vy[-1]:.2f} at epoch {vx[-1]:g}" if vy else ""))
    right.set_title("KL term")
    return _savefig(fig, path)


def _mean_band(curves: list[list[tuple[float, float]]]) -> tuple[list, list, list, list]:
    """x, mean, min, max over the curves at the x values every curve has (the seeds of one group
    evaluate at the same epochs)."""
    common = set.intersection(*(set(x for x, _ in c) for c in curves)) if curves else set()
    xs = sorted(common)
    at = [dict(c) for c in curves]
    ys = [[a[x] for a in at] for x in xs]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def learning_curves(series: list[dict[str, Any]], path: Path, marks: dict[str, float] | None = None) -> Path:
    """Test measure against epochs for each series (a group of seeds or one run), the mean line with
    the seeds' min-max band, and the NLLs vae-evaluate wrote as markers (mean over the seeds that
    have one at that epoch, with k in the legend). `marks`: label -> value, drawn as horizontal
    lines (a paper's number). Series: {"label", "measure", "curves": [[(epoch, value)]],
    "nll": [[(epoch, nll, k)]], "finished"}; an unfinished one is dashed."""
    fig = _figure(9, 5.5)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    late: list[float] = []  # values past the first tenth of a run: the y range worth seeing
    lows: list[float] = list((marks or {}).values())
    for i, s in enumerate(series):
        color = colors[i % len(colors)]
        xs, mean, lo, hi = _mean_band(s["curves"])
        n = len(s["curves"])
        style = "-" if s.get("finished", True) else "--"
        tail = "" if s.get("finished", True) else ", unfinished"
        if xs:
            last = f"{mean[-1]:.2f}" + (f" ± {statistics.stdev(c[-1][1] for c in s['curves']):.2f}" if n > 1 else "")
            ax.plot(
                xs,
                mean,
                style,
                color=color,
                lw=1.5,
                marker="o" if len(xs) <= 30 else None,  # a one-epoch run is a single point: visible
                ms=3,
                label=f"{s['label']}: {s['measure']}, n = {n}{tail} ({last} at epoch {xs[-1]:g})",
            )
            if n > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
            late += [y for x, y in zip(xs, mean) if x >= 0.1 * xs[-1]] or mean
            lows += lo
        by_epoch: dict[tuple[float, Any], list[float]] = {}
        for points in s["nll"]:
            for x, y, k in points:
                by_epoch.setdefault((x, k), []).append(y)
        for k in sorted({k for _, k in by_epoch}, key=str):
            pts = sorted((x, sum(v) / len(v)) for (x, kk), v in by_epoch.items() if kk == k)
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                ":",
                color=color,
                marker="o",
                ms=5,
                label=f"{s['label']}: NLL (k = {k}), {pts[-1][1]:.2f} at epoch {pts[-1][0]:g}",
            )
            lows += [y for _, y in pts]
            late += [y for _, y in pts]
    for j, (label, value) in enumerate((marks or {}).items()):
        ax.axhline(value, color=str(0.2 + 0.2 * (j % 3)), ls=(0, (5, 1 + 2 * j)), lw=1, label=f"{label}: {value:g}")
    if late:
        top, bottom = max(late), min(lows)
        ax.set_ylim(bottom - 0.05 * (top - bottom) - 0.2, top + 0.05 * (top - bottom) + 0.2)
    ax.set_xscale("log")
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("nats per test example, lower is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _savefig(fig, path)


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
