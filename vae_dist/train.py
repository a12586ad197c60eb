"""Train the VAE.

    accelerate launch vae_dist/train.py --config configs/mnist.yaml data.root=../shared/data
    python -m vae_dist.train --config configs/smoke.yaml train.epochs=2

Overrides are section.key=value (see README, "Configuration"). Exit codes: 0 done; 1 training
stopped (non-finite loss, failed checkpoint write); 2 bad config, data or checkpoint (one line on
stderr naming the problem); 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch vae_dist/train.py`): Python put vae_dist/ itself on sys.path,
    # where our module names (data, model, ...) could shadow installed packages. Use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

EXIT_FAILED = 1  # training stopped: non-finite loss, or a checkpoint could not be written
EXIT_BAD_INPUT = 2  # bad config, data, checkpoint or launch: nothing was trained
EXIT_PREEMPTED = 75  # a signal (SIGTERM, SIGINT, SIGUSR1) stopped it after a checkpoint: resume with train.resume=auto


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-train",
        description="Train the MNIST VAE with Accelerate.",
        epilog="Example: vae-train --config configs/mnist.yaml data.root=../shared/data train.epochs=1",
    )
    parser.add_argument("--config", default=None, help="YAML file in configs/ (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 model.z_dim=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vae_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:  # reported before torch is even imported
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from vae_dist.checkpoint import CheckpointError
    from vae_dist.data import DataError
    from vae_dist.trainer import LaunchError, NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, DataError, CheckpointError, LaunchError) as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = trainer.fit()
    except (CheckpointError, NonFiniteLossError) as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_PREEMPTED if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
