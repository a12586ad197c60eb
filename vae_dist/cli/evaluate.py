"""`vae-evaluate MODEL`: the test ELBO, recon, KL and the IWAE estimate of log p(x) of a trained VAE.

    python -m vae_dist.cli.evaluate runs/mnist --data-root ../shared/data
    vae-evaluate runs/mnist/checkpoints/step-00024000 --k 5000 --binarize dynamic
    accelerate launch --multi_gpu --num_processes 4 -m vae_dist.cli.evaluate runs/mnist --k 5000

The evaluation itself (vae_dist.evaluation) is exact on any process count: the split is cut into
fixed chunks of --batch-size examples dealt round-robin to the processes, and chunk c's noise comes
from (--seed, c) alone, so 1 process or 8 print the same numbers. Keep the chunk sizes fixed to
reproduce a number to the last digit: they choose *which* noise is drawn.

The binarized test set (--binarize static or dynamic) is, by default, the one every run and
evaluation sees: the grayscale test split binarized once with data.BINARIZE_SEED, so an NLL is
reproducible to the last digit and two models compare on the same 10,000 binary images. The IWAE
authors' code draws a fresh binarization at each evaluation; `--binarize-seed S` draws the test
set's Bernoulli pixels from seed S instead, so several seeds give that convention's mean and its
spread over binarizations.

Exit codes: 0 done; 2 bad input (model folder, data or arguments), one sentence on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from vae_dist.config import DataConfig, read_yaml
from vae_dist.data import BINARIZE_SEED, Split, binarize, load_data
from vae_dist.errors import EXIT_BAD_INPUT, BadInput, first_line
from vae_dist.evaluation import SAMPLES_PER_FORWARD, default_k_batch, evaluate_elbo, evaluate_iwae
from vae_dist.files import refuse_pickle
from vae_dist.model import VAE, ModelFileError
from vae_dist.pipes import quiet_when_the_reader_leaves
from vae_dist.processes import check_launch, set_cpu_threads


# ---------------------------------------------------------------- inputs
class EvalInputError(BadInput, ValueError):
    """The model folder, data or an argument is wrong; the message says what was expected."""


def resolve_model_dir(path: str) -> Path:
    """The folder holding model.safetensors + config.json: an exported model (run.dir) or a checkpoint."""
    p = Path(path)
    expected = (
        "an exported model folder (run.dir, holding model.safetensors and config.json) or a checkpoint "
        "folder (run.dir/checkpoints/step-XXXXXXXX)"
    )
    refuse_pickle(p, EvalInputError, f"; pass {expected}.")  # by content, whatever the name
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise EvalInputError(
            f"{p} is a pickle file, which is not loaded because unpickling can run arbitrary code; pass {expected}."
        )
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    if not p.is_dir():
        raise EvalInputError(f"model folder {p} does not exist; pass {expected}.")
    missing = [name for name in ("model.safetensors", "config.json") if not (p / name).is_file()]
    if missing:
        hint = ""
        ckpts = sorted((p / "checkpoints").glob("step-*")) if (p / "checkpoints").is_dir() else []
        if ckpts:
            hint = f" The run has checkpoints; the newest is {ckpts[-1]}."
        raise EvalInputError(f"{p} has no {' or '.join(missing)}; pass {expected}.{hint}")
    refuse_pickle(p / "model.safetensors", EvalInputError, f"; pass {expected}.")  # before any data is read
    return p


def training_data_config(model_dir: Path) -> tuple[dict, Path | None]:
    """The `data` section of the run that wrote `model_dir` (its config.yaml), or {} when none is found."""
    candidates = [model_dir / "config.yaml"]
    if model_dir.parent.name == "checkpoints":
        candidates.append(model_dir.parent.parent / "config.yaml")
    for path in candidates:
        if path.is_file():
            tree = read_yaml(path.read_text()) or {}
            data = tree.get("data") if isinstance(tree, dict) else None
            return (data if isinstance(data, dict) else {}), path
    return {}, None


def load_model(model_dir: Path, device: torch.device) -> VAE:
    """The model in `model_dir`, on `device` in eval mode; a file that does not load is an EvalInputError."""
    try:
        # strict (VAE's default too): a missing weight must not stay at its random init.
        model = VAE.from_pretrained(model_dir, strict=True)
    except ModelFileError as err:  # a pickle, a truncated file, foreign weights: names the file
        raise EvalInputError(str(err)) from None
    except Exception as err:  # anything else the loader did not foresee: the same advice
        raise EvalInputError(
            f"{model_dir} could not be loaded as a vae_dist model ({first_line(err)}); pass a "
            "folder written by vae-train (model.safetensors + config.json)."
        ) from err
    return model.to(device).eval()


@dataclass
class Inputs:
    """What an evaluation reads, each checked before the first forward pass."""

    model_dir: Path
    run_config: Path | None  # the run's config.yaml that unset data options came from
    data: DataConfig
    model: VAE
    test: Split


def load_inputs(args: argparse.Namespace, device: torch.device) -> Inputs:
    """The model and the test split the options name (unset data options: the run's); raises BadInput."""
    model_dir = resolve_model_dir(args.model)
    run_data, run_config = training_data_config(model_dir)
    data_cfg = DataConfig(
        root=args.data_root or run_data.get("root", "data"),
        dataset=args.dataset or run_data.get("dataset", "mnist"),
        binarize=args.binarize or run_data.get("binarize", "none"),
    )
    if args.binarize_seed is not None and data_cfg.binarize == "none":
        raise EvalInputError(
            "--binarize-seed re-binarizes the test split, but it is evaluated in grayscale (binarize none); "
            "add --binarize dynamic (or static), or drop --binarize-seed."
        )
    # The model first: a damaged file is named as such, before the data (perhaps a download) is tried.
    model = load_model(model_dir, device)
    _, test = load_data(data_cfg if args.binarize_seed is None else replace(data_cfg, binarize="none"))
    if args.binarize_seed is not None:
        test.images = binarize(test.images, torch.Generator().manual_seed(args.binarize_seed))
    x_dim = model.config_dict["x_dim"]
    if test.images.shape[1] != x_dim:
        raise EvalInputError(
            f"{model_dir} was trained on {x_dim} pixels but {data_cfg.dataset} has {test.images.shape[1]}."
        )
    return Inputs(model_dir, run_config, data_cfg, model, test)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vae-evaluate",
        description="Test ELBO, recon, KL and the importance-weighted log-likelihood (IWAE bound) of a trained VAE.",
        epilog="Example: vae-evaluate runs/mnist --data-root ../shared/data --k 5000",
    )
    parser.add_argument("model", help="exported model folder (run.dir) or checkpoint folder")
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw/; default: the run's data.root")
    parser.add_argument(
        "--dataset", default=None, choices=["mnist", "fashion_mnist", "kmnist"], help="default: the run's"
    )
    parser.add_argument(
        "--binarize",
        default=None,
        choices=["none", "static", "dynamic"],
        help="test data as data.binarize makes it (dynamic: the test split binarized once with a fixed seed); "
        "default: the run's data.binarize, else none",
    )
    parser.add_argument(
        "--binarize-seed",
        type=int,
        default=None,
        help=f"with --binarize static or dynamic: binarize the grayscale test split with this seed instead of "
        f"the fixed one every run sees ({BINARIZE_SEED}); a few seeds give the re-sampled convention's mean",
    )
    parser.add_argument("--k", type=int, default=5000, help="importance samples per example (default 5000)")
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="examples per chunk (default 1000, as train.eval_batch_size)"
    )
    parser.add_argument(
        "--k-batch",
        type=int,
        default=None,
        help=f"samples per example per forward; default {SAMPLES_PER_FORWARD} / batch",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0, as train.seed)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads per process on CPU; default usable cores / processes",
    )
    parser.add_argument("--out", default=None, help="JSON file written (default: <model>/eval.json)")
    args = parser.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')}={getattr(args, name)}: must be an integer >= 1."
        for name in ("k", "batch_size", "k_batch", "cpu_threads")
        if getattr(args, name) is not None and getattr(args, name) < 1
    ]
    if problems:
        # One line, as vae-sample and vae-bench print: parser.error would put the usage block above it.
        print(f"vae-evaluate: error: {' '.join(problems)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    return args


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vae-evaluate: {result['model']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    rows = [
        ("elbo", f"{result['elbo']:.3f}", "nats/example, -ELBO = recon + kl"),
        ("recon", f"{result['recon']:.3f}", "nats/example, -log p(x|z)"),
        ("kl", f"{result['kl']:.3f}", "nats/example, KL(q(z|x) || p(z))"),
        ("nll_iwae", f"{result['nll_iwae']:.3f}", f"nats/example, -log p(x), IWAE k={result['k']}"),
        ("examples", str(result["n_examples"]), f"{result['dataset']} test, binarize={result['binarize']}"),
        ("processes", str(result["processes"]), f"{result['seconds']:.1f} s wall"),
    ]
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)


def evaluate(inputs: Inputs, args: argparse.Namespace, acc: Accelerator, t0: float) -> dict:
    """The ELBO and the IWAE estimate of the test split, with what reproduces them: eval.json's content."""
    images = inputs.test.images.to(acc.device)
    k_batch = args.k_batch or default_k_batch(args.k, args.batch_size)

    def progress(done: int, total: int) -> None:
        if acc.is_main_process:
            print(f"iwae k={args.k}: chunk {done}/{total} of process 0, {time.perf_counter() - t0:.0f} s", flush=True)

    model, batch = inputs.model, args.batch_size
    elbo = evaluate_elbo(model, images, acc, seed=args.seed, batch_size=batch)
    iwae = evaluate_iwae(
        model, images, acc, seed=args.seed, k=args.k, batch_size=batch, k_batch=k_batch, progress=progress
    )
    binarize_seed = BINARIZE_SEED if args.binarize_seed is None else args.binarize_seed
    return {
        "model": str(inputs.model_dir),
        "elbo": elbo["elbo"],
        "recon": elbo["recon"],
        "kl": elbo["kl"],
        "nll_iwae": iwae["nll_iwae"],
        "k": args.k,
        "n_examples": len(inputs.test),
        "dataset": inputs.data.dataset,
        "binarize": inputs.data.binarize,
        # the seed of the test set's binarization (None: grayscale)
        "binarize_seed": None if inputs.data.binarize == "none" else binarize_seed,
        "run_config": str(inputs.run_config) if inputs.run_config else None,  # where unset data options came from
        "seed": args.seed,
        "batch_size": args.batch_size,
        "k_batch": k_batch,
        "seconds": time.perf_counter() - t0,
        "processes": acc.num_processes,
    }


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    try:
        check_launch(acc.num_processes)
        crowded = (
            set_cpu_threads(args.cpu_threads, acc.num_processes, "--cpu-threads") if acc.device.type == "cpu" else None
        )
        inputs = load_inputs(args, acc.device)
    except BadInput as err:
        message = str(err).replace("point data.root at", "point --data-root at")  # the data module's advice
        print(f"vae-evaluate: error: {message}", file=sys.stderr)
        return err.exit_code
    if crowded:  # the inputs are good: the evaluation starts, slower than it could
        print(f"vae-evaluate: warning: {crowded}", file=sys.stderr, flush=True)
    result = evaluate(inputs, args, acc, t0)
    if acc.is_main_process:
        out = Path(args.out) if args.out else inputs.model_dir / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print_table(result)
        print(f"wrote {out}")
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
