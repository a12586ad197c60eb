"""Plots of a run and of a set of runs, with matplotlib: the latent scatter, the loss curves of a run,
and the learning curves of a results table.

matplotlib's object API on the Agg canvas: no pyplot, no global backend switch, safe on a headless
node; matplotlib is imported only when a plot is drawn (~0.3 s).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from vae_dist.grids import encode_means

SCATTER_MAX = 5_000  # test means drawn in latent.png: the first 5000 test examples (half the CPU cost of all 10,000)


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
        shown, low = _mean_line(ax, s, color)
        nll = _nll_lines(ax, s, color)
        late += shown + nll
        lows += low + nll
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


def _mean_line(ax, s: dict[str, Any], color: str) -> tuple[list[float], list[float]]:
    """Series `s`'s mean over its seeds, with their min-max band when there are several; returns the
    values past the first tenth of the run (the y range worth seeing) and the band's lower edge."""
    xs, mean, lo, hi = _mean_band(s["curves"])
    if not xs:
        return [], []
    n = len(s["curves"])
    style = "-" if s.get("finished", True) else "--"
    tail = "" if s.get("finished", True) else ", unfinished"
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
    return [y for x, y in zip(xs, mean) if x >= 0.1 * xs[-1]] or mean, lo


def _nll_lines(ax, s: dict[str, Any], color: str) -> list[float]:
    """Series `s`'s NLLs, one dotted line per k, each point the mean over the seeds that have one at
    that epoch; returns the values drawn."""
    by_epoch: dict[tuple[float, Any], list[float]] = {}
    for points in s["nll"]:
        for x, y, k in points:
            by_epoch.setdefault((x, k), []).append(y)
    drawn: list[float] = []
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
        drawn += [y for _, y in pts]
    return drawn
