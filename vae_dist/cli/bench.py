"""Training throughput: the original script's loop, a minimal tensor loop, the floor of one step and
the toolkit, in one process.

    python -m vae_dist.cli.bench data.root=../shared/data                      # CPU, fp32, batch 100
    python -m vae_dist.cli.bench data.root=../shared/data --batch-size 1000
    vae-bench --device cuda --precision bf16 --json bench.json            # random data if data.root lacks MNIST

Four variants train the same 784-512-256-2 VAE with Adam: the original script's loop, a minimal
tensor loop, the floor of one step, and the toolkit's Trainer through the loop `fit()` runs (the
loops and their data: vae_dist.cli.bench_loops). This module times them; vae_dist.cli.bench_report
writes the result and its table.

Each variant is built once, warmed up, then timed for `--steps` optimizer steps per repeat, the
variants alternating (a b c d, b c d a, ...) so that load from other processes spreads over all of
them; the table gives the median examples/s of the repeats and the ratios toolkit/original,
toolkit/minimal and toolkit/floor. Evaluation is not timed (the reference's per-epoch timer does
not include it either).

Peak memory: each variant runs again alone in a fresh subprocess (`--probe NAME`), which reports its
peak resident set size (Linux VmHWM) and, on CUDA, `torch.cuda.max_memory_allocated`. One process
cannot measure several variants: the peak RSS is a high-water mark that never goes down, memory freed
by one variant stays in the allocator for the next, and tracemalloc sees Python objects only, not
the tensors torch allocates in C++. The peak includes the libraries (importing torch alone maps
about 0.5 GB); the JSON also gives the peak over the RSS right after the variant's imports.

Subnormal floats: after about 700 steps at batch 100, Adam's first moment of the weights whose
gradient is almost always exactly zero (MNIST's black border pixels, dead ReLU units) decays by
beta1 = 0.9 a step into float32's subnormal range, where each x86 operation on it is many times
slower: every variant then loses about 40% of its speed. So a timing window that straddles that
step measures two regimes. The toolkit flushes subnormals to zero on the CPU (train.flush_denormal,
on by default); the bench does the same for every variant, once, before torch starts its worker
threads (they copy the mode from the main thread when they start). `--denormals keep` measures IEEE
arithmetic in all of them (warm up past step 1,000 to see its steady state).

Data: the real training split when `data.root` holds the IDX files, else random uint8 images of the
same shape (60,000 x 784), generated once with a fixed seed. The bench never downloads.
Exit codes: 0 done; 2 bad option, config or data (one line on stderr saying what to change).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vae_dist.cli.bench_loops import LOOPS, Context, has_real_data
from vae_dist.cli.bench_report import bench_result, machine, others_cores, render
from vae_dist.errors import EXIT_BAD_INPUT as EXIT_BAD_INPUT  # what main returns for a BadInput
from vae_dist.errors import BadInput
from vae_dist.pipes import quiet_when_the_reader_leaves

VARIANTS = ("original", "minimal", "floor", "toolkit")
# Modules each variant needs before it builds anything: imported first in a memory probe, so that
# "peak over imports" counts the variant's data, model and loop, not its libraries.
IMPORTS = {
    "original": ("torchvision.datasets", "torchvision.transforms", "torch.utils.data"),
    "minimal": ("vae_dist.data",),
    "floor": ("vae_dist.data",),
    "toolkit": ("vae_dist.trainer",),
}


class BenchInputError(BadInput, ValueError):
    """An option the bench cannot honour here; the message says what to change."""


# ---------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vae-bench",
        description="Time the original MNIST VAE loop, a minimal tensor loop and the vae_dist trainer; "
        "print examples/s (median of repeats) and the ratios, as a table and as JSON.",
        epilog="Example: vae-bench data.root=../shared/data --batch-size 100",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present")
    p.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no", help="no = fp32 (default)")
    p.add_argument("--batch-size", type=int, default=100, help="examples per optimizer step (default 100)")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per timed repeat (default: 20,000 examples' worth)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: steps / 4)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per variant; the median is reported")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in the original, minimal and toolkit variants (the floor stays eager or one CUDA graph)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for all variants (default: usable cores)"
    )
    p.add_argument(
        "--minimal-loss",
        choices=("logits", "sigmoid"),
        default="logits",
        help="minimal loop's loss: BCE on logits like the toolkit (default), or sigmoid + BCE like the original",
    )
    p.add_argument(
        "--minimal-adam",
        choices=("default", "fused"),
        default="default",
        help="minimal loop's Adam: torch's default like minimal_loop.py (default), or fused to compare framework overhead alone",
    )
    p.add_argument(
        "--denormals",
        choices=("flush", "keep"),
        default="flush",
        help="flush (default): subnormal floats are zero in every variant, so the speed does not depend on "
        "how far training has got; keep: IEEE subnormals (after ~700 steps they slow every variant on x86)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON result to PATH")
    p.add_argument("--config", default=None, help="YAML config for the toolkit (default: built-in defaults)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value for the toolkit config, e.g. data.root=../shared/data"
    )
    p.add_argument("--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # memory subprocess
    args = p.parse_intermixed_args(argv)  # overrides may stand before, between or after the options
    if args.steps is None:
        args.steps = max(10, round(20_000 / max(args.batch_size, 1)))
    if args.warmup is None:
        args.warmup = max(5, args.steps // 4)
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key, low in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("repeats", 1), ("threads", 1)):
        value = getattr(args, key)
        if value is not None and value < low:
            out.append(f"--{key.replace('_', '-')}={value}: must be an integer >= {low}.")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not names or any(v not in VARIANTS for v in names):
        out.append(f"--variants={args.variants}: give a comma-separated subset of {', '.join(VARIANTS)}.")
    return out


def bench_config(args: argparse.Namespace, run_dir: str):
    """The toolkit's Config: the user's file and overrides, then the bench's own settings on top."""
    from vae_dist.config import ConfigError, load_config

    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}",
            f"train.compile={str(args.compile).lower()}",
            f"train.cpu_threads={args.threads}",
            f"train.flush_denormal={str(args.denormals == 'flush').lower()}",  # as in the other two variants
            "train.max_steps=null",  # the bench decides how many steps run
            "train.resume=none",
            "tracking.mode=off",
            f"run.dir={run_dir}",
        ],
    )
    # The variants must do the same arithmetic for the ratios to mean anything.
    problems = []
    if len(cfg.model.hidden_dims) != 2:
        problems.append(
            f"model.hidden_dims={cfg.model.hidden_dims}: the original loop has exactly two hidden layers; give two widths."
        )
    if cfg.model.objective != "elbo":
        problems.append("model.objective: the original loop trains the ELBO; leave model.objective=elbo.")
    if cfg.data.binarize != "none":
        problems.append("data.binarize: the original loop trains on grayscale targets; leave data.binarize=none.")
    if problems:
        raise ConfigError(" ".join(problems))
    return cfg


# ---------------------------------------------------------------- timing
class _Discard:
    """stdout while a variant steps: the toolkit's log_train prints a line every log_every_steps; the
    bench keeps the cost of formatting and writing it, not the noise."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot, stolen time included (Linux), else None."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_steps(loop: Iterator[int], steps: int, sync: Callable[[], None]) -> tuple[int, float, float | None]:
    """(examples, seconds, others) of `steps` optimizer steps, the device drained before and after.
    `others`: cores that other processes kept busy meanwhile. On a 2-core machine even a fraction of
    one core costs torch's two threads far more than its share (each parallel region waits for the
    thread that lost its core), so a repeat with others > 0.1 is not a clean measurement."""
    gc.collect()
    sync()
    with contextlib.redirect_stdout(_Discard()):
        busy0, own0 = busy_cpu_seconds(), sum(os.times()[:2])
        t0 = time.perf_counter()
        examples = sum(next(loop) for _ in range(steps))
        sync()
        seconds = time.perf_counter() - t0
        busy1, own1 = busy_cpu_seconds(), sum(os.times()[:2])
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds
    return examples, seconds, others


def time_variants(ctx: Context, names: list[str]) -> dict[str, dict]:
    """Build and warm up every variant, then time them alternating; examples/s per repeat."""
    import torch

    args = ctx.args
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    loops = {}
    for name in names:
        loops[name] = LOOPS[name](ctx)
        t0 = time.perf_counter()
        run_steps(loops[name], max(args.warmup, 1), sync)  # builds it, then warms it up
        print(f"  {name}: built and warmed up ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        torch.set_num_threads(ctx.args.threads)  # the Trainer sets it too: keep every variant on one count
        torch.set_flush_denormal(ctx.args.denormals == "flush")  # in case a variant changed it
    runs: dict[str, list[float]] = {n: [] for n in names}
    others: dict[str, list[float | None]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # a b c, b c a, c a b, ...
        for name in order:
            examples, seconds, busy = run_steps(loops[name], args.steps, sync)
            runs[name].append(examples / seconds)
            others[name].append(None if busy is None else round(busy, 2))
        line = "  ".join(f"{n} {runs[n][-1]:,.0f}" for n in names)
        busiest = max((o[-1] for o in others.values() if o[-1] is not None), default=None)
        load = "" if busiest is None else f"  (other processes: {busiest:.2f} cores)"
        print(f"  repeat {r + 1}/{args.repeats} (examples/s): {line}{load}", file=sys.stderr, flush=True)
    return {
        n: {
            "examples_per_s": statistics.median(v),
            "runs": [round(x, 1) for x in v],
            "ms_per_step": 1000 * args.batch_size / statistics.median(v),
            "others_cores": others[n],  # per repeat: cores other processes used meanwhile
        }
        for n, v in runs.items()
    }


# ---------------------------------------------------------------- memory
def max_rss_bytes() -> int:
    """Peak resident set size of this process. On Linux VmHWM, not ru_maxrss: ru_maxrss survives
    exec, so a probe started by the 1 GB bench process would report at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, others KiB


def probe(ctx: Context, name: str) -> dict:
    """In a fresh process: import, build, warm up and run one variant; its peak memory."""
    import torch

    for module in IMPORTS[name]:
        importlib.import_module(module)
    after_imports = max_rss_bytes()
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    loop = LOOPS[name](ctx)
    run_steps(loop, ctx.args.warmup + ctx.args.steps, sync)  # the same work as in the timing
    out = {"peak_rss_mib": max_rss_bytes() / 2**20, "rss_after_imports_mib": after_imports / 2**20}
    out["peak_rss_over_imports_mib"] = out["peak_rss_mib"] - out["rss_after_imports_mib"]
    if ctx.device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def probe_in_subprocess(argv: list[str], name: str) -> dict:
    """Runs `python -m vae_dist.cli.bench ARGV --probe NAME` and reads the one JSON line it prints."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the repository: importable even when not installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "vae_dist.cli.bench", *argv, "--probe", name],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the memory probe of {name} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- entry point
def set_up_torch(args: argparse.Namespace):
    """The torch.device the bench runs on; torch's thread count and subnormal mode set once for every variant."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: the Trainer picks CUDA whenever it sees one
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda but torch sees no CUDA device; use --device cpu.")
    if args.device == "cpu" and torch.cuda.is_available():
        raise BenchInputError("could not hide CUDA; run with CUDA_VISIBLE_DEVICES= set.")
    if args.threads is None:
        args.threads = machine()["cores"]
    # Before any parallel work: torch's worker threads copy this flag from the main thread when they
    # are created, and a later call reaches the main thread only.
    torch.set_flush_denormal(args.denormals == "flush")
    torch.set_num_threads(args.threads)  # the same count for every variant (the Trainer gets it as cpu_threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def chosen_variants(args: argparse.Namespace) -> list[str]:
    """The variants --variants names, in VARIANTS order, less the original where torchvision is missing."""
    names = [v for v in VARIANTS if v in {x.strip() for x in args.variants.split(",")}]
    if "original" in names and importlib.util.find_spec("torchvision") is None:
        # A GPU machine's own Python may lack it; the other variants do not need it.
        names.remove("original")
        print("vae-bench: original: not run, torchvision is not installed", file=sys.stderr, flush=True)
    return names


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def warn_if_crowded(variants: dict[str, dict]) -> None:
    """One line on stderr when other processes took more than 0.1 core during a timed repeat."""
    others = others_cores(variants)
    if others and max(others) > 0.1:
        print(
            f"vae-bench: warning: other processes used up to {max(others):.2f} cores during the timed repeats "
            f"(in {sum(o > 0.1 for o in others)} of {len(others)}); rerun on an idle machine for numbers to quote.",
            file=sys.stderr,
        )


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        problems = check_args(args)
        if problems:
            raise BenchInputError(" ".join(problems))
        device = set_up_torch(args)
        load_before = load_average()
        with tempfile.TemporaryDirectory(prefix="vae-bench-") as run_dir:
            cfg = bench_config(args, run_dir)
            ctx = Context(cfg=cfg, device=device, args=args, real=has_real_data(cfg.data))
            if args.probe:
                print(json.dumps(probe(ctx, args.probe)))
                return 0
            names = chosen_variants(args)
            print(f"vae-bench: {device.type}, data: {ctx.data_label()}", file=sys.stderr, flush=True)
            variants = time_variants(ctx, names)
    except BadInput as err:  # an option, the config or the data
        print(f"vae-bench: error: {err}", file=sys.stderr)
        return err.exit_code
    import torch

    threads, load_after = torch.get_num_threads(), load_average()
    warn_if_crowded(variants)
    if not args.no_memory:
        for name in names:
            print(f"  {name}: measuring peak memory in a fresh process", file=sys.stderr, flush=True)
            variants[name].update(probe_in_subprocess(argv, name))
    result = bench_result(args, ctx, variants, threads, [load_before, load_after])
    print(render(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
