"""Train the VAE.

    accelerate launch vae_dist/train.py --config configs/mnist.yaml data.root=../shared/data
    python -m vae_dist.train --config configs/smoke.yaml train.epochs=2

Overrides are section.key=value (see README, "Configuration"). Exit codes: 0 done; 1 training
stopped (non-finite loss, a file or checkpoint that could not be written: one sentence on stderr
naming it and the last good checkpoint); 2 bad config, data, checkpoint, launch, or a run.dir another
run holds (one sentence on stderr naming the problem); 75 stopped by SIGTERM/SIGINT/SIGUSR1, after
saving a checkpoint when a step ran since the last one (during start-up: at once, nothing written);
76 a process of a multi-process run stopped answering for dist.timeout_s (vae_dist.peers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the process's work begins: imports count as start-up

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch vae_dist/train.py`): Python put vae_dist/ itself on sys.path,
    # where our module names (data, model, ...) could shadow installed packages. Use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import gc  # noqa: E402

EXIT_FAILED = 1  # training stopped: non-finite loss, or a checkpoint or file could not be written
EXIT_BAD_INPUT = 2  # bad config, data, checkpoint or launch, or run.dir in use: nothing was trained
EXIT_PREEMPTED = 75  # a signal (SIGTERM, SIGINT, SIGUSR1) stopped it after a checkpoint: rerun the same command


def exception_chain(err: BaseException):
    """`err` and the exceptions it was raised from or during (its cause and context), newest first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-train",
        description="Train the MNIST VAE with Accelerate.",
        epilog="Example: vae-train --config configs/mnist.yaml data.root=../shared/data train.epochs=1",
    )
    parser.add_argument("--config", default=None, help="YAML file in configs/ (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 model.z_dim=10")
    return parser.parse_intermixed_args(argv)  # overrides may stand before or after --config


def main(argv: list[str] | None = None) -> int:
    from vae_dist.signals import Stopped, StopSignals, signal_name

    # First of all: from here on a stop signal has a documented outcome (see vae_dist.signals).
    signals = StopSignals().install()
    try:
        return run(parse_args(argv), signals)
    except BaseException as err:  # Stopped is a BaseException (vae_dist.signals)
        # A start-up signal raises Stopped wherever the process is; inside a library's own cleanup
        # (argparse's parse_intermixed_args restores its state in a `finally`) it can surface as
        # another error with the Stopped as its context.
        stop = next((e for e in exception_chain(err) if isinstance(e, Stopped)), None)
        if stop is None:
            raise
        print(
            f"vae-train: stopped by {signal_name(stop.signum)} during start-up, before any training step: "
            "nothing needed saving. Rerun the same command to start (or resume).",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    finally:
        signals.uninstall()


def run(args: argparse.Namespace, signals) -> int:
    from vae_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:  # reported before torch is even imported
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from vae_dist.checkpoint import CheckpointError
    from vae_dist.data import DataError
    from vae_dist.runlock import RunLocked
    from vae_dist.trainer import LaunchError, MetricsFileError, Trainer

    try:
        trainer = Trainer(cfg, signals=signals, started=STARTED)
    except (ConfigError, DataError, CheckpointError, LaunchError, RunLocked, MetricsFileError) as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return fit(trainer)
    finally:
        # A DDP model holds its gloo process group; freed only at interpreter shutdown (the trainer is
        # in reference cycles), gloo's threads then abort a finished run with SIGABRT: 1 in 40
        # 3-process runs here, 0 in 60 with this collect (pytorch/pytorch#179291 describes it).
        del trainer
        gc.collect()


def fit(trainer) -> int:
    """Train; the exit code, with one sentence on stderr for a run that stopped on an error."""
    from safetensors import SafetensorError

    from vae_dist.checkpoint import CheckpointError, latest_valid
    from vae_dist.trainer import NonFiniteLossError

    try:
        summary = trainer.fit()
    except (CheckpointError, NonFiniteLossError) as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, SafetensorError) as err:  # metrics.jsonl, config.yaml or the export: disk full, permissions
        what = getattr(err, "filename", None) or "a file in run.dir"
        reason = getattr(err, "strerror", None) or str(err)
        last = latest_valid(trainer.run_dir, warn=False)
        print(
            f"vae-train: error: could not write {what} ({reason}); the last good checkpoint is "
            f"{last or 'none (no checkpoint was saved)'}. Free disk space or fix the permissions of "
            f"{trainer.run_dir}, then rerun the same command to resume.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_PREEMPTED if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
