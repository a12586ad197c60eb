"""`vae-results RUN_DIR_OR_GLOB...`: one table row per experiment, over its seeds.

    vae-results runs/mnist/seed-*                      # the runs vae-seeds or a Slurm array wrote
    vae-results runs/mnist runs/sweeps/original/*.jsonl --processor "Intel Xeon, 1 thread" --compare
    vae-results 'runs/*/seed-*' --json

Each argument is a run directory of `vae-train` (config.yaml + metrics.jsonl), a folder whose
sub-folders are such runs (what `vae-seeds` writes), a JSON-lines file of the original script
(`reference_vae.py ... > seed-3.jsonl`), or a glob of those (quoted: the command expands it too).

Runs whose configs differ only in `train.seed` and `run.dir` form a group, one row: n, and the mean
± sample standard deviation [min, max] of the final and the best test −ELBO, the NLL where
`vae-evaluate` wrote an eval.json, and the training examples/s with the processor that ran it
(<run.dir>/runtime.json; `--processor` names it for runs that did not record it, such as the
original script's). Keys that cannot change a number in the table (tracking.*, checkpoint.*,
train.resume) are left out of the comparison; anything else that differs makes another row.
Runs that have not finished are listed apart, with why, and never enter a mean.

Exit codes: 0 the table; 1 no run has finished yet (the list says why); 2 a path that is not a run
(one sentence on stderr).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import socket
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_dist.config import ConfigError, config_from_dict, read_yaml
from vae_dist.pipes import quiet_when_the_reader_leaves
from vae_dist.tracking import MetricsFile

EXIT_NOTHING_FINISHED = 1  # the runs exist, none has finished: the list says why
EXIT_BAD_INPUT = 2  # a path that is not a run
# Config keys that say where and how a run is kept, not what it trains: left out of the group key.
IGNORED = ("train.seed", "run.dir", "train.resume", "tracking.", "checkpoint.")
ORIGINAL = "original script"
MEASURES = ("final_elbo", "best_elbo", "nll", "examples_per_s")


class NotARun(ValueError):
    """A path given to vae-results is neither a run directory nor an original-script output."""


class NothingToPlot(ValueError):
    """--plot was asked for, but no run has a point to draw."""


@dataclass
class Run:
    path: Path
    kind: str  # "vae_dist" or ORIGINAL
    seed: int | None
    config: dict[str, Any]  # flattened section.key -> value; the original script: what its output says
    final_elbo: float | None = None  # nats per test example, the last evaluation
    best_elbo: float | None = None  # the lowest of the evaluations
    nll: float | None = None  # vae-evaluate's nll_iwae
    nll_k: int | None = None
    examples_per_s: float | None = None  # training only, over the whole run
    processor: str | None = None
    epochs: int = 0  # evaluated epochs
    why_unfinished: str | None = None
    notes: list[str] = field(default_factory=list)
    # The learning curve: (epoch, the test measure the run trained for) at each evaluation, and
    # (epoch, NLL, k) where vae-evaluate wrote an eval.json (into run.dir or a checkpoint's folder).
    curve: list[tuple[float, float]] = field(default_factory=list)
    curve_label: str = "test −ELBO"
    nll_points: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.why_unfinished is None

    def group_key(self) -> str:
        kept = {k: v for k, v in self.config.items() if not k.startswith(IGNORED) and k not in IGNORED}
        return json.dumps([self.kind, kept], sort_keys=True, default=str)


# ------------------------------------------------------------------ reading runs
def flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in config.items() for key, value in (keys or {}).items()}


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file())


def is_original_output(path: Path) -> bool:
    """A file of the original script's JSON lines: {"epoch", "train_s", "samples_per_s", "train_loss", "test_loss"}."""
    if not path.is_file():
        return False
    try:
        with path.open() as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and {"epoch", "test_loss"} <= first.keys()


def seed_from_name(path: Path) -> int | None:
    m = re.search(r"seed[-_=]?(\d+)", path.name)
    return int(m.group(1)) if m else None


def weighted_rate(pairs: list[tuple[float, float]]) -> float | None:
    """Examples per second over windows given as (examples, examples per second): total / total time."""
    seconds = sum(n / r for n, r in pairs if r and r > 0)
    examples = sum(n for n, r in pairs if r and r > 0)
    return examples / seconds if seconds > 0 else None


def lock_holder(run_dir: Path) -> str | None:
    """'pid N on host H' when the run's .lock names a process that is alive on this host (a run in progress)."""
    try:
        holder = json.loads((run_dir / ".lock").read_text() or "{}")
        pid, host = int(holder["pid"]), holder.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return f"pid {pid} on {host}"


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml, flattened, with today's defaults for keys it predates: a key added later
    (its default keeps the old behaviour) must not split a run from the seeds that came after it. A
    config this version cannot read (a removed key) is compared as written."""
    if not path.is_file():
        return {}
    raw = read_yaml(path.read_text()) or {}
    try:
        return flatten(config_from_dict(raw).to_dict())
    except (ConfigError, TypeError, AttributeError):
        return flatten(raw)


def read_vae_dist_run(path: Path) -> Run:
    config = read_config(path / "config.yaml")
    run = Run(path=path, kind="vae_dist", seed=config.get("train.seed"), config=config)
    try:
        records, torn = MetricsFile(path / "metrics.jsonl").read_checked()
    except ValueError as err:
        run.why_unfinished = str(err)
        return run
    if torn is not None:
        run.notes.append(f"{path / 'metrics.jsonl'}: dropped a torn last line (the run was killed while writing it)")
    tests = [r for r in records if r.get("split") == "test" and r.get("elbo") is not None]
    trains = [r for r in records if r.get("split") == "train"]
    if tests:
        run.final_elbo = tests[-1]["elbo"]
        run.best_elbo = min(r["elbo"] for r in tests)
        run.epochs = tests[-1].get("epoch", 0)
    batch = config.get("train.batch_size", 0)
    previous, windows = 0, []
    for r in trains:
        windows.append(((r["step"] - previous) * batch, r.get("examples_per_s")))
        previous = r["step"]
    run.examples_per_s = weighted_rate(windows)
    read_curve(run, tests)
    if (path / "eval.json").is_file():
        try:
            ev = json.loads((path / "eval.json").read_text())
            run.nll, run.nll_k = ev.get("nll_iwae"), ev.get("k")
            if run.curve and isinstance(run.nll, (int, float)):  # the exported model: the last evaluated epoch
                run.nll_points = sorted([*run.nll_points, (run.curve[-1][0], run.nll, run.nll_k)])
        except ValueError:
            run.notes.append(f"{path / 'eval.json'} is not JSON: its NLL is left out")
    if (path / "runtime.json").is_file():
        try:
            run.processor = json.loads((path / "runtime.json").read_text()).get("processor")
        except ValueError:
            pass
    run.why_unfinished = why_unfinished(run, records)
    return run


def read_curve(run: Run, tests: list[dict[str, Any]]) -> None:
    """The run's learning curve and the NLLs vae-evaluate wrote into its checkpoints' folders
    (checkpoints/step-N/eval.json, at step N; run.dir/eval.json is read by the caller). The curve is
    the test `loss`, the bound the run trained for: the ELBO, or for objective iwae the k-sample bound."""
    steps_per_epoch = next((r["step"] / r["epoch"] for r in tests if r.get("epoch") and r.get("step")), None)
    run.curve = [(r["step"] / steps_per_epoch, r["loss"]) for r in tests if steps_per_epoch and "loss" in r]
    if run.config.get("model.objective") == "iwae":
        run.curve_label = f"test −IWAE bound (k = {run.config.get('model.k')})"
    for folder in sorted(run.path.glob("checkpoints/step-*")):
        step = re.fullmatch(r"step-(\d+)", folder.name)
        try:
            ev = json.loads((folder / "eval.json").read_text())
        except (OSError, ValueError):
            continue  # a checkpoint nobody evaluated
        if step and steps_per_epoch and isinstance(ev.get("nll_iwae"), (int, float)):
            run.nll_points.append((int(step.group(1)) / steps_per_epoch, ev["nll_iwae"], ev.get("k")))
    run.nll_points.sort()


def why_unfinished(run: Run, records: list[dict[str, Any]]) -> str | None:
    """None for a run that trained to its end and exported its model; else why not, in a few words."""
    cfg, path = run.config, run.path
    if not cfg:
        return "no config.yaml: the run never got past its start"
    epochs, max_steps = cfg.get("train.epochs"), cfg.get("train.max_steps")
    last = records[-1] if records else {}
    step = last.get("step", 0)
    done = bool(records) and (run.epochs >= (epochs or 0) or (max_steps is not None and step >= max_steps))
    if done and (path / "model.safetensors").is_file() and run.final_elbo is not None:
        return None
    holder = lock_holder(path)
    checkpoints = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    where = f"at step {step}, epoch {run.epochs} of {epochs}"
    if holder:
        return f"still running ({holder}), {where}"
    if not records:
        return "no metrics yet: it stopped (or failed) before its first log line"
    if checkpoints:
        return f"stopped {where} (preempted or failed); newest checkpoint {checkpoints[-1].name}: rerun its command to resume"
    return f"stopped {where} before its first checkpoint (failed or killed); rerun its command to start again"


def read_original_run(path: Path) -> Run:
    """The original script's output: one JSON line per epoch; no config, so its folder is its group."""
    lines = path.read_text().splitlines()
    records, notes = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                return Run(path, ORIGINAL, seed_from_name(path), {}, why_unfinished=f"line {number} is not JSON")
            notes.append(f"{path}: dropped a torn last line (the script was killed while writing it)")
    run = Run(path=path, kind=ORIGINAL, seed=seed_from_name(path), config={"folder": str(path.parent)}, notes=notes)
    tests = [r["test_loss"] for r in records if "test_loss" in r]
    if tests:
        run.final_elbo, run.best_elbo, run.epochs = tests[-1], min(tests), records[-1].get("epoch", len(tests))
    run.examples_per_s = weighted_rate([(r["samples_per_s"] * r["train_s"], r["samples_per_s"]) for r in records])
    return run


def expand(arguments: list[str]) -> list[Path]:
    """Paths from the arguments: globs expanded, a folder of runs (vae-seeds' base folder) opened one level."""
    paths: list[Path] = []
    for arg in arguments:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise NotARun(f"{arg} matches nothing; give run directories (e.g. runs/mnist/seed-*) or their base folder.")
        for match in map(Path, matches):
            if not match.exists():
                raise NotARun(f"{match} does not exist; give run directories (e.g. runs/mnist/seed-*).")
            if match.is_dir() and not is_run_dir(match):
                inner = sorted(p for p in match.iterdir() if is_run_dir(p) or is_original_output(p))
                if not inner:
                    raise NotARun(
                        f"{match} is not a run: it holds no config.yaml or metrics.jsonl (what vae-train writes "
                        "into run.dir), and no folder or original-script JSON-lines file inside it is one either; "
                        "give run directories, e.g. runs/mnist/seed-*."
                    )
                paths += inner
            elif match.is_file() and not is_original_output(match):
                raise NotARun(
                    f"{match} is not a run: a file must be the original script's JSON lines (one object per "
                    "epoch with epoch and test_loss); give run directories, or such files."
                )
            else:
                paths.append(match)
    return list(dict.fromkeys(paths))  # a run named twice counts once


def read_runs(paths: list[Path]) -> list[Run]:
    return [read_original_run(p) if p.is_file() else read_vae_dist_run(p) for p in paths]


# ------------------------------------------------------------------ the table
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


def original_unfinished(runs: list[Run]) -> None:
    """The original script's output says nothing about the epochs it was asked for: a file with fewer
    epochs than the longest in its folder is unfinished (or still running)."""
    by_folder: dict[str, list[Run]] = {}
    for run in runs:
        if run.kind == ORIGINAL and run.finished:
            by_folder.setdefault(str(run.path.parent), []).append(run)
    for members in by_folder.values():
        most = max(r.epochs for r in members)
        for run in members:
            if run.final_elbo is None:
                run.why_unfinished = "no epoch finished yet"
            elif run.epochs < most:
                run.why_unfinished = (
                    f"{run.epochs} of {most} epochs (the longest in its folder): stopped or still running"
                )


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


# ------------------------------------------------------------------ output
def fmt(s: dict[str, Any] | None, digits: int = 2, thousands: bool = False) -> str:
    if not s:
        return "—"
    f = (lambda v: f"{v:,.0f}") if thousands else (lambda v: f"{v:.{digits}f}")
    std = "" if s["std"] is None else f" ± {f(s['std'])}"
    span = f" [{f(s['min'])}, {f(s['max'])}]" if s["n"] > 1 else ""
    return f"{f(s['mean'])}{std}{span}"


LABELS = {"final_elbo": "final test −ELBO", "best_elbo": "best test −ELBO"}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-results",
        description="Mean ± std over seeds: one row per group of runs whose configs differ only in train.seed and run.dir.",
        epilog="Example: vae-results runs/mnist/seed-* runs/sweeps/original/*.jsonl --compare",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR_OR_GLOB",
        help="run directories, their base folder, original-script JSON-lines files, or globs",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also each row against the first: difference of the means and its standard error",
    )
    parser.add_argument(
        "--processor", default=None, help="the processor of runs that did not record one (the original script's)"
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="also draw the learning curves: each row's test measure against epochs (mean, min-max band over "
        "its seeds), the NLLs vae-evaluate wrote (run.dir or checkpoint folders), unfinished runs dashed",
    )
    parser.add_argument(
        "--mark",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="with --plot: a horizontal line at VALUE nats, e.g. --mark 'Burda et al. 2016, VAE=86.76'; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        args.marks = {label: float(value) for label, _, value in (m.rpartition("=") for m in args.mark)}
    except ValueError:
        parser.error(f"--mark takes LABEL=VALUE with a number after the last '=', e.g. 'paper=86.76'; got {args.mark}.")
    if any(not label for label in args.marks):
        parser.error("--mark needs a label before '=', e.g. 'paper=86.76'.")
    return args


def plot(
    rows: list[dict[str, Any]], runs: list[Run], unfinished: list[Run], path: Path, marks: dict[str, float]
) -> Path:
    """The learning curves of the table's rows, then each unfinished run's (dashed): progress so far."""
    from vae_dist.figures import learning_curves  # lazy: matplotlib and torch only when drawing

    by_path = {str(r.path): r for r in runs}
    series = []
    for row in rows:
        members = [by_path[p] for p in row["paths"] if by_path[p].curve]
        if members and members[0].kind != ORIGINAL:
            series.append(
                {
                    "label": row["runs"],
                    "measure": members[0].curve_label,
                    "curves": [r.curve for r in members],
                    "nll": [r.nll_points for r in members],
                    "finished": True,
                }
            )
    for r in unfinished:
        if r.curve:
            series.append(
                {
                    "label": str(r.path),
                    "measure": r.curve_label,
                    "curves": [r.curve],
                    "nll": [r.nll_points],
                    "finished": False,
                }
            )
    if not any(c for s in series for c in s["curves"]) and not any(p for s in series for p in s["nll"]):
        raise NothingToPlot(
            f"--plot {path}: nothing to draw, no run given has finished an epoch (the curves are test measures "
            "against epochs); plot again once one has, or read the table above."
        )
    return learning_curves(series, path, marks)


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = read_runs(expand(args.paths))
    except NotARun as err:
        print(f"vae-results: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for run in runs:
        run.processor = run.processor or args.processor
    original_unfinished(runs)
    rows, unfinished = group_runs(runs)
    notes = [n for r in runs for n in r.notes]
    diffs = compare(rows) if args.compare and len(rows) > 1 else None
    if args.json:
        out = {
            "groups": rows,
            "unfinished": [{"path": str(r.path), "why": r.why_unfinished} for r in unfinished],
            "notes": notes,
        }
        if diffs is not None:
            out["compare"] = diffs
        print(json.dumps(out, indent=1))
    else:
        print(markdown(rows, unfinished, notes, diffs))
    if args.compare and len(rows) > 1:
        single = [r["runs"] for r in rows if r["final_elbo"] and r["final_elbo"]["std"] is None]
        if single:
            print(
                f"vae-results: --compare: {', '.join(single)} {'has' if len(single) == 1 else 'have'} one run, so "
                "the spread over seeds, and the standard error of a difference, is unknown; add seeds to compare.",
                file=sys.stderr,
            )
    if args.plot:
        try:
            print(f"vae-results: wrote {plot(rows, runs, unfinished, Path(args.plot), args.marks)}", file=sys.stderr)
        except NothingToPlot as err:
            print(f"vae-results: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if not rows:
        print("vae-results: no run among the paths given has finished; nothing to average.", file=sys.stderr)
        return EXIT_NOTHING_FINISHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
