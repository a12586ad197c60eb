"""`vae-seeds`: N seeds of one experiment on one machine, each an ordinary `vae-train` run.

    vae-seeds --config mnist --seeds 5 data.root=../shared/data     # runs/mnist/seed-0 .. seed-4
    vae-seeds --config smoke --seeds 3 --base-seed 10 run.dir=runs/smoke3
    vae-seeds --config mnist --seeds 5 --dry-run                     # the commands, nothing run
    vae-seeds --config mnist --task 3 --print-overrides              # what Slurm array task 3 adds

Seed n trains with `train.seed=n` into `<run.dir>/seed-<n>` (its own lock, checkpoints, metrics and
`train.log`), in the W&B group `tracking.group` (default: the sweep's name, the last folder of
run.dir), where its run is named after its folder, `seed-<n>`. Rerunning the same command resumes
every seed from its newest checkpoint (train.resume=auto); a finished seed only re-exports its model.

Where the seeds run:
- GPUs: one seed per GPU at once (CUDA_VISIBLE_DEVICES=<that GPU> for its process), the next seed on
  the first GPU that frees up. The GPUs are those CUDA_VISIBLE_DEVICES lists, else all torch sees.
- CPU: the seeds share the cores: as many at once as there are usable cores (or cores /
  train.cpu_threads when that is set), each with its share, `train.cpu_threads` = cores / K, so the
  torch threads of the K processes never oversubscribe the cores; the next seed starts when one
  ends. Measured faster than one after another with all cores each (see plan()).
  `--parallel 1` runs them one after another.

Exit codes: 0 every seed finished; 1 a seed did not finish (the summary names each, with its exit
code and last error line); 2 bad input (config, options), nothing started; 75 stopped by SIGTERM,
SIGINT or SIGUSR1, forwarded to the running seeds, which checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vae_dist.config import Config, load_config
from vae_dist.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED, BadInput
from vae_dist.pipes import quiet_when_the_reader_leaves

EXIT_OK = 0
EXIT_NOT_ALL_FINISHED = 1  # a seed did not finish; EXIT_PREEMPTED (as vae-train): a signal stopped the seeds
TRAIN_EXITS = {  # what vae-train's exit codes mean, in the summary
    EXIT_OK: "finished",
    EXIT_FAILED: "failed",
    EXIT_BAD_INPUT: "refused its input (nothing trained)",
    EXIT_PREEMPTED: "stopped by a signal after a checkpoint: rerun to resume",
}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Seed:
    seed: int
    run_dir: Path
    overrides: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what its process adds to the environment
    exit_code: int | None = None
    seconds: float = 0.0
    slot: str = ""  # the GPU or the CPU share it ran on
    log: Path | None = None

    def result(self) -> str:
        what = TRAIN_EXITS.get(self.exit_code, f"exit {self.exit_code}")
        if self.exit_code is None:
            return "not started (the sweep was stopped first)"
        if self.exit_code in (EXIT_FAILED, EXIT_BAD_INPUT) or self.exit_code not in TRAIN_EXITS:
            error = last_error(self.log)
            return f"{what}: {error}" if error else what
        return what


def last_error(log: Path | None) -> str | None:
    """The last line of a seed's log that says what went wrong ("vae-train: error: ...", a traceback's end)."""
    if log is None or not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else None


def sweep_name(cfg: Config) -> str:
    """The W&B group of a sweep unless tracking.group is set: the last folder of run.dir (runs/mnist -> mnist)."""
    return Path(cfg.run.dir).resolve().name


def seed_overrides(cfg: Config, seed: int) -> list[str]:
    """What turns the sweep's config into the run of one seed: its seed, its run.dir and the sweep's W&B group."""
    out = [f"train.seed={seed}", f"run.dir={Path(cfg.run.dir) / f'seed-{seed}'}"]
    if cfg.tracking.group is None:
        out.append(f"tracking.group={sweep_name(cfg)}")
    return out


def visible_gpus() -> list[str]:
    """The GPUs a seed may take, as CUDA_VISIBLE_DEVICES entries: those it lists, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cores() -> int:
    # vae_dist.processes imports torch: only running seeds pays for it, not --print-overrides in a Slurm task.
    from vae_dist.processes import usable_cores

    return usable_cores()


def plan(cfg: Config, seeds: list[int], parallel: int | None, overrides: list[str]) -> tuple[list[Seed], list[str]]:
    """The runs, and the slots they run in: a GPU each, or a share of the CPU cores."""
    gpus = [] if cfg.train.device == "cpu" else visible_gpus()
    shared = [o for o in overrides if not o.startswith("run.dir=")]  # each seed gets its own, below
    runs = [Seed(s, Path(cfg.run.dir) / f"seed-{s}", [*shared, *seed_overrides(cfg, s)]) for s in seeds]
    if gpus:
        width = parallel or len(gpus)
        slots = [gpus[i % len(gpus)] for i in range(width)]
        return runs, [f"GPU {g}" for g in slots]
    cores, chosen = usable_cores(), cfg.train.cpu_threads
    # Sharing the cores finished sooner than one seed after another. On the 2-core VM, 2 seeds of
    # configs/mnist.yaml with train.epochs=2, 8 alternating repetitions on a machine other work
    # shared: side by side (1 thread each) 20.1 and 23.5 s with nothing else running, 33.1 and 36.6 s
    # beside one other busy thread; one after another (2 threads each) 87.6 s beside one other busy
    # thread, 169-266 s beside more: 2 threads and anything else oversubscribe 2 cores.
    width = min(parallel or max(1, cores // (chosen or 1)), len(runs))
    threads = chosen or max(1, cores // width)
    share = "all cores" if width == 1 and threads >= cores else f"{threads} of {cores} cores"
    for run in runs:
        run.env = {"CUDA_VISIBLE_DEVICES": ""} if cfg.train.device == "cpu" else {}
        run.env["VAE_DIST_UNDER_SEEDS"] = (
            "1"  # vae_dist.processes.UNDER_SEEDS: a crowded-cores warning names --parallel
        )
        if chosen is None:
            run.overrides.append(f"train.cpu_threads={threads}")
            run.env["OMP_NUM_THREADS"] = str(threads)  # also any OpenMP pool started before torch's setting
    return runs, [f"CPU {i} ({share})" if width > 1 else f"CPU ({share})" for i in range(width)]


def train_command(config: str | None, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "vae_dist.cli.train", *(["--config", config] if config else []), *overrides]


class Sweep:
    """Runs the seeds in their slots, forwards stop signals to the running ones, and keeps the exit codes."""

    def __init__(self, config: str | None, runs: list[Seed], slots: list[str]):
        self.config = config
        self.pending = list(runs)
        self.runs = runs
        self.free = list(slots)
        self.running: dict[subprocess.Popen, tuple[Seed, str, float]] = {}
        self.stopped_by: int | None = None

    def on_signal(self, signum: int, frame) -> None:
        if self.stopped_by is None:
            print(
                f"vae-seeds: got {signal.Signals(signum).name}: stopping the running seeds (each saves a checkpoint); "
                "no new seed starts. Rerun the same command to resume.",
                file=sys.stderr,
                flush=True,
            )
        self.stopped_by = self.stopped_by or signum
        for proc in self.running:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def start(self, run: Seed, slot: str) -> None:
        env = {**os.environ, **run.env}
        if slot.startswith("GPU "):
            env["CUDA_VISIBLE_DEVICES"] = slot.removeprefix("GPU ")  # the seed's process sees its GPU only
        run.slot = slot
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.log = run.run_dir / "train.log"
        cmd = train_command(self.config, run.overrides)
        with run.log.open("a") as log:
            log.write(f"vae-seeds: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"vae-seeds: seed {run.seed} started on {slot} (pid {proc.pid}), log {run.log}", flush=True)
        self.running[proc] = (run, slot, time.perf_counter())

    def run(self) -> None:
        previous = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        try:
            while self.running or (self.pending and self.stopped_by is None):
                while self.free and self.pending and self.stopped_by is None:
                    self.start(self.pending.pop(0), self.free.pop(0))
                time.sleep(0.2)
                for proc in [p for p in self.running if p.poll() is not None]:
                    run, slot, t0 = self.running.pop(proc)
                    run.exit_code, run.seconds = proc.returncode, time.perf_counter() - t0
                    self.free.append(slot)
                    print(
                        f"vae-seeds: seed {run.seed} {TRAIN_EXITS.get(run.exit_code, f'exit {run.exit_code}')} "
                        f"(exit {run.exit_code}) after {run.seconds:.1f} s",
                        flush=True,
                    )
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def summary(runs: list[Seed], seconds: float) -> str:
    done = [r for r in runs if r.exit_code == 0]
    lines = [f"vae-seeds: {len(done)} of {len(runs)} seeds finished in {seconds:.1f} s"]
    width = max(len(str(r.run_dir)) for r in runs)
    for r in runs:
        code = "-" if r.exit_code is None else str(r.exit_code)
        lines.append(f"  seed {r.seed:<4} exit {code:<3} {r.seconds:7.1f} s  {str(r.run_dir):<{width}}  {r.result()}")
    missing = [r for r in runs if r.exit_code != 0]
    if missing:
        lines.append("not finished: " + "; ".join(f"seed {r.seed} ({r.result()})" for r in missing))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-seeds",
        description="Train N seeds of one experiment on this machine: one per GPU at once, or sharing the CPU cores.",
        epilog="Example: vae-seeds --config configs/mnist.yaml --seeds 5 data.root=../shared/data; then vae-results runs/mnist",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a YAML file, or the name of a shipped config: mnist, smoke, ... (default: built-in defaults)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="how many seeds: base-seed, base-seed + 1, ... (default 3)"
    )
    parser.add_argument("--base-seed", type=int, default=None, help="the first seed (default: the config's train.seed)")
    parser.add_argument(
        "--task", type=int, default=None, help="only seed base-seed + TASK (a Slurm array task's index)"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="seeds at once (default: one per GPU; on a CPU one per core, each process with cores / K threads; "
        "1: one after another)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print each seed's command, run nothing")
    parser.add_argument(
        "--print-overrides",
        action="store_true",
        help="print the overrides that make each seed's run, one per line (what slurm/train_seeds.sbatch adds)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for every seed, e.g. train.epochs=10")
    args = parser.parse_intermixed_args(argv)
    for name in ("seeds", "parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value}: must be an integer >= 1.")
    if args.task is not None and args.task < 0:
        parser.error(f"--task={args.task}: must be an integer >= 0 (a Slurm array index).")
    if args.task is not None and args.seeds is not None:
        parser.error("--task runs one seed (base-seed + TASK); drop --seeds, or drop --task to run several.")
    return args


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except BadInput as err:
        print(f"vae-seeds: error: {err}", file=sys.stderr)
        return err.exit_code
    base = cfg.train.seed if args.base_seed is None else args.base_seed
    seeds = [base + args.task] if args.task is not None else [base + i for i in range(args.seeds or 3)]
    if args.print_overrides:
        for s in seeds:
            print("\n".join(seed_overrides(cfg, s)))
        return EXIT_OK
    runs, slots = plan(cfg, seeds, args.parallel, list(args.overrides))
    if args.dry_run:
        for run in runs:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items())
            print(f"{env + ' ' if env else ''}{shlex.join(train_command(args.config, run.overrides))}")
        print(f"# {len(runs)} seeds, {len(slots)} at once: {', '.join(slots)}")
        return EXIT_OK
    print(
        f"vae-seeds: {len(runs)} seeds ({', '.join(map(str, seeds))}), {len(slots)} at once on {', '.join(slots)}",
        flush=True,
    )
    t0 = time.perf_counter()
    sweep = Sweep(args.config, runs, slots)
    sweep.run()
    print(summary(runs, time.perf_counter() - t0), flush=True)
    print(f"vae-seeds: the table: vae-results {cfg.run.dir}", flush=True)
    if all(r.exit_code == 0 for r in runs):
        return EXIT_OK
    if sweep.stopped_by is not None and all(r.exit_code in (0, EXIT_PREEMPTED, None) for r in runs):
        return EXIT_PREEMPTED
    return EXIT_NOT_ALL_FINISHED


if __name__ == "__main__":
    sys.exit(main())
