"""Train the VAE.

    accelerate launch vae_dist/train.py --config configs/mnist.yaml data.root=../shared/data
    python -m vae_dist.train --config configs/smoke.yaml train.epochs=2

Overrides are section.key=value (see README, "Configuration"). Exit codes: 0 done; 2 bad config or
data (one line on stderr naming the problem, nothing written).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch vae_dist/train.py`): Python put vae_dist/ itself on sys.path,
    # where our module names (data, model, ...) could shadow installed packages. Use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402

EXIT_BAD_INPUT = 2


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
    from vae_dist.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        from vae_dist.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, DataError) as err:
        print(f"vae-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
