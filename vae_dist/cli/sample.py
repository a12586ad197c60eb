"""Draw pictures from a trained VAE: prior samples, reconstructions, interpolations and, for z = 2, the manifold.

    python -m vae_dist.cli.sample runs/mnist --data-root ../shared/data
    vae-sample runs/mnist/checkpoints/step-6000 --out pictures --seed 1 --n 100 --examples 0,1,2,3 \
        --interpolate 3 2 --interpolate 0 1 --steps 12

MODEL is an exported model (a run directory) or a checkpoint directory; both hold model.safetensors
and config.json. The pictures are seeded: the same command draws the same PNGs, byte for byte.
Data settings (root, dataset, binarization) default to those in the run's config.yaml when one is
found beside the model or up to two folders above it. Exit codes: 0 done; 2 bad model, data or
option (one line on stderr says what and what to do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae_dist.errors import BadInput, first_line
from vae_dist.pipes import quiet_when_the_reader_leaves

MODEL_FILES = ("model.safetensors", "config.json")


class SampleError(BadInput, ValueError):
    """A model, data or option problem; the message says what was expected."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vae-sample",
        description="Write PNG grids from a trained VAE: prior samples, reconstructions, interpolations, "
        "and the latent manifold when z = 2.",
        epilog="Example: vae-sample runs/mnist --data-root ../shared/data --seed 1 --interpolate 3 2",
    )
    p.add_argument("model", type=Path, help="exported model or checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: MODEL/samples)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the prior noise and of the default examples (default 0)"
    )
    p.add_argument("--n", type=int, default=64, help="prior samples, drawn in a square grid (default 64)")
    p.add_argument(
        "--data-root", default=None, help="folder holding MNIST/raw/ (default: from the run's config.yaml, else data)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=["mnist", "fashion_mnist", "kmnist"],
        help="default: from config.yaml, else mnist",
    )
    p.add_argument(
        "--binarize",
        default=None,
        choices=["none", "static", "dynamic"],
        help="test pixels as in training (default: from config.yaml, else none)",
    )
    p.add_argument(
        "--examples",
        default=None,
        help="test indices to reconstruct, e.g. 0,1,2 (default: 2 seeded examples per digit)",
    )
    p.add_argument(
        "--interpolate",
        nargs=2,
        type=int,
        action="append",
        metavar=("I", "J"),
        help="test indices to interpolate between in z; repeat for more rows (default: 5 seeded pairs of different digits)",
    )
    p.add_argument(
        "--steps", type=int, default=10, help="decoded points on each interpolation line, ends included (default 10)"
    )
    p.add_argument(
        "--grid", type=int, default=20, help="manifold.png is GRID x GRID decoder outputs, z = 2 only (default 20)"
    )
    p.add_argument(
        "--no-data", action="store_true", help="skip reconstructions and interpolations: no test data needed"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    return p.parse_args(argv)


def model_folder(path: Path) -> Path:
    """The folder holding model.safetensors + config.json; `path` may also be the safetensors file."""
    from vae_dist.files import refuse_pickle

    for file in (path, path / MODEL_FILES[0]):  # by content, whatever the name, before any data is read
        refuse_pickle(
            file,
            SampleError,
            "; give an exported model (a run directory) or a checkpoint directory written by vae-train, "
            f"both holding {' and '.join(MODEL_FILES)}.",
        )
    folder = path.parent if path.is_file() and path.suffix == ".safetensors" else path
    if not folder.is_dir():
        raise SampleError(
            f"{path} does not exist; give an exported model (a run directory) or a checkpoint directory, "
            f"both holding {' and '.join(MODEL_FILES)}."
        )
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise SampleError(
            f"{folder} holds no {' or '.join(missing)}; give an exported model (the run.dir of a finished run) "
            f"or a checkpoint directory, both holding {' and '.join(MODEL_FILES)}."
        )
    return folder


def data_config(folder: Path, args: argparse.Namespace):
    """DataConfig from the command line, falling back to the run's config.yaml, then the defaults.
    Never downloads: the sample command must not wait on a network."""
    from vae_dist.config import ConfigError, DataConfig, load_config

    base = DataConfig()
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file():
            try:
                base = load_config(candidate / "config.yaml").data
                break
            except ConfigError:
                continue
    return DataConfig(
        root=args.data_root or base.root,
        dataset=args.dataset or base.dataset,
        binarize=args.binarize or base.binarize,
        download=False,
    )


def _indices(text: str, n: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise SampleError(f"{what} {text!r}: give test indices separated by commas, e.g. 0,1,2.") from None
    bad = [v for v in values if not 0 <= v < n]
    if not values or bad:
        raise SampleError(f"{what} {text}: the test split has {n} examples, so indices run from 0 to {n - 1}.")
    return values


def draw(args: argparse.Namespace) -> dict[str, Path]:
    """Write the PNGs; returns {"prior": path, ...}. Every input is checked before the first PNG is
    written, so a SampleError leaves --out as it was."""
    import torch

    from vae_dist import figures
    from vae_dist.model import VAE, ModelFileError

    for name, value, low in (("--n", args.n, 1), ("--steps", args.steps, 2), ("--grid", args.grid, 2)):
        if value < low:
            raise SampleError(f"{name} {value}: must be at least {low}.")
    folder = model_folder(args.model)
    out = args.out or folder / "samples"
    try:
        model = VAE.from_pretrained(str(folder)).to(args.device).eval()
    except ModelFileError as err:  # a pickle, a truncated file, foreign weights: the message names the file
        raise SampleError(str(err)) from None
    except Exception as err:
        raise SampleError(
            f"{folder} could not be loaded as a VAE ({first_line(err, 200)}); give a folder written by "
            "vae-train (the run directory or one of its checkpoints)."
        ) from err

    chosen = pairs = None
    if not args.no_data:
        chosen, pairs, images = _test_inputs(folder, args, model, figures)
    paths = {"prior": figures.prior_grid(model, figures.fixed_noise(model.z_dim, args.seed, args.n), out / "prior.png")}
    manifold = figures.latent_manifold(model, out / "manifold.png", n=args.grid)
    if manifold is not None:
        paths["manifold"] = manifold
    if chosen is not None:
        paths["recon"] = figures.recon_grid(model, images[chosen], out / "recon.png", ncol=min(10, len(chosen)))
    if pairs:
        a = images[torch.tensor([i for i, _ in pairs])]
        b = images[torch.tensor([j for _, j in pairs])]
        paths["interpolation"] = figures.interpolation_grid(model, a, b, out / "interpolation.png", steps=args.steps)
    return paths


def _test_inputs(folder: Path, args: argparse.Namespace, model, figures):
    """(indices to reconstruct, pairs to interpolate, test images uint8 [N, 784]) from the options,
    or the seeded defaults: 2 examples per digit, and 5 pairs of different digits."""
    import torch

    from vae_dist.data import DataError, load_split

    cfg = data_config(folder, args)
    try:
        test = load_split(cfg, train=False)
    except DataError as err:
        raise SampleError(
            f"{err} With vae-sample: pass --data-root DIR (and --dataset), or --no-data to draw only prior "
            "samples and the manifold."
        ) from None
    n, x_dim = len(test), model.config_dict["x_dim"]
    if test.images.shape[1] != x_dim:
        raise SampleError(
            f"{folder} holds a model of {x_dim} pixels, but {cfg.dataset} images have {test.images.shape[1]}."
        )
    if args.examples is not None:
        chosen = torch.tensor(_indices(args.examples, n, "--examples"))
    else:
        chosen = figures.fixed_examples(test.labels, args.seed)
    if args.interpolate:
        pairs = [(i, j) for i, j in args.interpolate]
        for i, j in pairs:
            if not (0 <= i < n and 0 <= j < n):
                raise SampleError(
                    f"--interpolate {i} {j}: the test split has {n} examples, so indices run from 0 to {n - 1}."
                )
    else:  # one example per digit, ordered by digit: pairs (0, 1), (2, 3), ...
        one_per_digit = figures.fixed_examples(test.labels, args.seed, per_class=1).tolist()
        pairs = list(zip(one_per_digit[0::2], one_per_digit[1::2]))
    return chosen, pairs, test.images


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = draw(args)
    except BadInput as err:
        print(f"vae-sample: error: {err}", file=sys.stderr)
        return err.exit_code
    for key, path in paths.items():
        print(f"{key:>13}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
