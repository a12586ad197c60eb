"""The vae-results table: runs that differ only in their seed form one row, with n and the mean ±
sample standard deviation [min, max] of each measure; rows compared by the difference of their
means and its standard error; the table as Markdown."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

from vae_dist.run_folders import ORIGINAL, Run

MEASURES = ("final_elbo", "best_elbo", "nll", "examples_per_s")
LABELS = {"final_elbo": "final test −ELBO", "best_elbo": "best test −ELBO"}


def stats(values: list[float]) -> dict[str, float | int] | None:
    """n, mean, sample standard deviation (n - 1; None for one value), min and max."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def common_prefix(paths: list[Path]) -> str:
    """runs/mnist/seed-{0,1,2} for three seeds' folders; the one path for one run."""
    if len(paths) == 1:
        return str(paths[0])
    parents = {str(p.parent) for p in paths}
    names = [p.name for p in paths]
    stem = re.sub(r"\d+$", "", os.path.commonprefix(names))  # seed-10, seed-11: seed-{10,11}, not seed-1{0,1}
    tails = [n[len(stem) :] for n in names]
    end = re.sub(r"^\d+", "", os.path.commonprefix([t[::-1] for t in tails])[::-1])  # seed-0.jsonl: the .jsonl
    tails = [t[: len(t) - len(end)] for t in tails]
    inner = ",".join(tails) if sum(map(len, tails)) < 60 else f"{tails[0]}..{tails[-1]}"
    where = parents.pop() if len(parents) == 1 else os.path.commonpath([str(p) for p in paths])
    return f"{where}/{stem}{{{inner}}}{end}"


def group_runs(runs: list[Run]) -> tuple[list[dict[str, Any]], list[Run]]:
    """Rows (one per group of finished runs that differ only in seed and run.dir) and the unfinished runs."""
    finished = [r for r in runs if r.finished]
    groups: dict[str, list[Run]] = {}
    for run in finished:
        groups.setdefault(run.group_key(), []).append(run)
    keys = [json.loads(k)[1] for k in groups]
    # What sets a group apart: the keys whose values are not the same in every group of vae-train runs
    # (the original script's output has no config to compare).
    configs = [cfg for key, cfg in zip(groups, keys) if json.loads(key)[0] != ORIGINAL]
    varying = sorted({k for cfg in configs for k in cfg if any(other.get(k) != cfg.get(k) for other in configs)})
    rows = []
    for members, cfg in zip(groups.values(), keys):
        members.sort(key=lambda r: (r.seed is None, r.seed, str(r.path)))
        nll_k = sorted({r.nll_k for r in members if r.nll is not None})
        rows.append(
            {
                "runs": common_prefix([r.path for r in members]),
                "kind": members[0].kind,
                "n": len(members),
                "seeds": [r.seed for r in members],
                "differs_in": {k: cfg.get(k) for k in varying if members[0].kind != ORIGINAL},
                "final_elbo": stats([r.final_elbo for r in members]),
                "best_elbo": stats([r.best_elbo for r in members]),
                "nll": stats([r.nll for r in members if r.nll is not None]),
                "nll_k": nll_k,
                "examples_per_s": stats([r.examples_per_s for r in members]),
                "processor": sorted({r.processor or "not recorded" for r in members}),
                "paths": [str(r.path) for r in members],
                "values": {m: [getattr(r, m) for r in members] for m in MEASURES},
            }
        )
    return rows, [r for r in runs if not r.finished]


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row against the first: the difference of the means and its standard error,
    sqrt(s1²/n1 + s2²/n2) (Welch; the seeds of two programs draw different random streams, so the
    runs are independent samples, not pairs)."""
    out = []
    base = rows[0]
    for row in rows[1:]:
        for measure in ("final_elbo", "best_elbo"):
            a, b = row[measure], base[measure]
            if not a or not b or a["std"] is None or b["std"] is None:
                continue
            diff = a["mean"] - b["mean"]
            se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            out.append(
                {
                    "measure": measure,
                    "row": row["runs"],
                    "against": base["runs"],
                    "difference": diff,
                    "se": se,
                    "ratio": diff / se if se > 0 else math.inf,
                }
            )
    return out


# ------------------------------------------------------------------ Markdown
def fmt(s: dict[str, Any] | None, digits: int = 2, thousands: bool = False) -> str:
    if not s:
        return "—"
    f = (lambda v: f"{v:,.0f}") if thousands else (lambda v: f"{v:.{digits}f}")
    std = "" if s["std"] is None else f" ± {f(s['std'])}"
    span = f" [{f(s['min'])}, {f(s['max'])}]" if s["n"] > 1 else ""
    return f"{f(s['mean'])}{std}{span}"


def markdown(rows: list[dict[str, Any]], unfinished: list[Run], notes: list[str], diffs: list[dict] | None) -> str:
    lines = [
        "| runs | n | final test −ELBO | best test −ELBO | NLL (IWAE) | examples/s | processor | config |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        nll = fmt(r["nll"]) + (f" (k = {', '.join(map(str, r['nll_k']))}, n = {r['nll']['n']})" if r["nll"] else "")
        config = (
            "original script" if r["kind"] == ORIGINAL else ", ".join(f"{k}={v}" for k, v in r["differs_in"].items())
        )
        lines.append(
            f"| {r['runs']} | {r['n']} | {fmt(r['final_elbo'])} | {fmt(r['best_elbo'])} | {nll} | "
            f"{fmt(r['examples_per_s'], thousands=True)} | {'; '.join(r['processor'])} | {config or '—'} |"
        )
    lines.append("")
    lines.append(
        "mean ± sample std [min, max] over the runs of a row; nats per test example; examples/s: training only."
    )
    if diffs:
        lines += [
            "",
            "| measure | runs | minus | difference | standard error | difference / SE |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for d in diffs:
            lines.append(
                f"| {LABELS[d['measure']]} | {d['row']} | {d['against']} | {d['difference']:+.2f} | {d['se']:.2f} | {d['ratio']:+.1f} |"
            )
    if unfinished:
        lines += ["", "Not finished (not in the table):", ""]
        lines += [f"- {r.path}: {r.why_unfinished}" for r in unfinished]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)
