"""Train the VAE.

    accelerate launch vae_dist/train.py --config mnist data.root=../shared/data
    vae-train --config smoke train.epochs=2

Overrides are section.key=value (docs/training.md, "Configuration"). Exit codes: 0 done; 1 training
stopped (non-finite loss, a file or checkpoint that could not be written: one sentence on stderr
naming it and the last good checkpoint); 2 bad config, data, checkpoint, launch, or a run.dir another
run holds (one sentence on stderr naming the problem); 75 stopped by SIGTERM/SIGINT/SIGUSR1, after
saving a checkpoint when a step ran since the last one (during start-up: at once, nothing written);
76 a process of a multi-process run stopped answering for dist.timeout_s (vae_dist.peers).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the process's work begins: imports count as start-up

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402

from vae_dist.errors import EXIT_FAILED, EXIT_PREEMPTED  # noqa: E402


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
        epilog="Example: vae-train --config mnist data.root=../shared/data train.epochs=1",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a YAML file, or the name of a config shipped in vae_dist/configs/: mnist, smoke, ... (default: built-in defaults)",
    )
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
    from vae_dist.config import load_config
    from vae_dist.errors import VaeDistError

    try:
        cfg = load_config(args.config, args.overrides)  # a config error is reported before torch is imported
        from vae_dist.trainer import Trainer

        trainer = Trainer(cfg, signals=signals, started=STARTED)
    except VaeDistError as err:  # refused during start-up: nothing was trained (exit 2)
        print(f"vae-train: error: {err}", file=sys.stderr)
        return err.exit_code
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

    from vae_dist.checkpoint import latest_valid
    from vae_dist.errors import VaeDistError

    try:
        summary = trainer.fit()
    except VaeDistError as err:  # a failed checkpoint write, a diverged loss: once training began, a failure (1)
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
