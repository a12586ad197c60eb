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
import json
import sys
from pathlib import Path
from typing import Any

from vae_dist.errors import BadInput
from vae_dist.pipes import quiet_when_the_reader_leaves
from vae_dist.results_table import compare, group_runs, markdown
from vae_dist.run_folders import ORIGINAL, Run, expand, original_unfinished, read_runs

EXIT_NOTHING_FINISHED = 1  # the runs exist, none has finished: the list says why


class NothingToPlot(BadInput, ValueError):
    """--plot was asked for, but no run has a point to draw."""


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
    from vae_dist.plots import learning_curves  # lazy: matplotlib and torch only when drawing

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


def print_table(args: argparse.Namespace, runs: list[Run], rows: list[dict[str, Any]], unfinished: list[Run]) -> None:
    """The table on stdout (JSON with --json, else Markdown); with --compare, the rows of one run on stderr."""
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


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = read_runs(expand(args.paths))
        for run in runs:
            run.processor = run.processor or args.processor
        original_unfinished(runs)
        rows, unfinished = group_runs(runs)
        print_table(args, runs, rows, unfinished)
        if args.plot:
            print(f"vae-results: wrote {plot(rows, runs, unfinished, Path(args.plot), args.marks)}", file=sys.stderr)
    except BadInput as err:  # a path that is not a run, nothing to plot
        print(f"vae-results: error: {err}", file=sys.stderr)
        return err.exit_code
    if not rows:
        print("vae-results: no run among the paths given has finished; nothing to average.", file=sys.stderr)
        return EXIT_NOTHING_FINISHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
