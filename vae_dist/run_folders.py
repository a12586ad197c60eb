"""What vae-results reads: a run directory of `vae-train` (config.yaml + metrics.jsonl), a folder
of such runs (what `vae-seeds` writes), or a JSON-lines file of the original script
(`reference_vae.py ... > seed-3.jsonl`), each read into a `Run` record: its config, final and best test
−ELBO, NLL, examples/s, learning curve, and why it has not finished when it has not.

A run has finished when it trained to its end and exported its model; one still running (its
run.dir lock names a live process on this host), stopped before its end or without a config says
so in `why_unfinished`, which vae-results prints and keeps out of every mean.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_dist.config import ConfigError, config_from_dict, read_yaml
from vae_dist.errors import BadInput
from vae_dist.metrics_file import MetricsFile

# Config keys that say where and how a run is kept, not what it trains: left out of the group key.
IGNORED = ("train.seed", "run.dir", "train.resume", "tracking.", "checkpoint.")
ORIGINAL = "original script"


class NotARun(BadInput, ValueError):
    """A path given to vae-results is neither a run directory nor an original-script output."""


@dataclass
class Run:
    """One run as vae-results reads it; `why_unfinished` is None once it trained to its end."""

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
