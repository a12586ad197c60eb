"""Exact, topology-independent evaluation of a VAE on a split: the ELBO and the IWAE estimate of log p(x).

    python -m vae_dist.evaluate runs/mnist --data-root ../shared/data
    vae-evaluate runs/mnist/checkpoints/step-00024000 --k 5000 --binarize dynamic
    accelerate launch --multi_gpu --num_processes 4 -m vae_dist.evaluate runs/mnist --k 5000

The split is cut into fixed chunks of `batch_size` examples, dealt round-robin to the processes;
per-example sums are reduced once at the end. Every example is counted exactly once (no padding,
unlike a padded distributed sampler), and chunk c's noise comes from a generator seeded by
(seed, c) alone, so the result is the same on 1 process or 8. The chunk sizes choose *which* noise
is drawn (not the expectation): keep them fixed to reproduce a number to the last digit.

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
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from vae_dist.config import DataConfig, read_yaml
from vae_dist.data import BINARIZE_SEED, DataError, binarize, load_data, to_unit
from vae_dist.files import pickle_kind, pickle_refusal
from vae_dist.model import VAE, ModelFileError, log_weights, loss_terms
from vae_dist.pipes import quiet_when_the_reader_leaves
from vae_dist.processes import LaunchError, check_launch, set_cpu_threads
from vae_dist.streams import EVAL_STREAM, IWAE_STREAM, TERMS, seed_for

SAMPLES_PER_FORWARD = 50_000  # default examples x samples decoded at once: ~0.5 GB of fp32 activations
EXIT_BAD_INPUT = 2


@torch.no_grad()
def evaluate_elbo(
    model: torch.nn.Module,
    images: torch.Tensor,
    accelerator: Accelerator,
    *,
    seed: int,
    batch_size: int,
    k: int = 1,
    objective: str = "elbo",
) -> dict[str, float]:
    """Mean per-example loss, elbo, recon, kl (nats) over `images` (uint8 [N, 784] on the device)."""
    acc = accelerator
    was_training = model.training
    model.eval()
    n = images.shape[0]
    z_dim = model.z_dim
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64, device=acc.device)
    gen = torch.Generator(device=acc.device)
    for c in range(acc.process_index, math.ceil(n / batch_size), acc.num_processes):
        x = to_unit(images[c * batch_size : (c + 1) * batch_size])
        gen.manual_seed(seed_for(seed, EVAL_STREAM, c))
        eps = torch.randn(x.shape[0], k, z_dim, generator=gen, device=acc.device)
        with acc.autocast():
            terms = loss_terms(model, x, eps, objective)
        sums[:-1] += torch.stack([terms[t].double().sum() for t in TERMS])
        sums[-1] += x.shape[0]
    model.train(was_training)
    *totals, count = acc.reduce(sums, reduction="sum").tolist()  # the one host sync (float64)
    if int(count) != n:
        raise RuntimeError(f"evaluation counted {int(count)} of {n} examples; every process must call it")
    return {t: total / count for t, total in zip(TERMS, totals)}


# ---------------------------------------------------------------- importance-weighted log-likelihood
def default_k_batch(k: int, batch_size: int) -> int:
    """Samples per example per forward so that one forward decodes about SAMPLES_PER_FORWARD z's."""
    return max(1, min(k, SAMPLES_PER_FORWARD // batch_size))


@torch.no_grad()
def iwae_log_px(model: VAE, x: torch.Tensor, k: int, k_batch: int, generator: torch.Generator) -> torch.Tensor:
    """log p(x) estimate per example [B] (float64, nats): log (1/k) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x).

    Burda et al. 2016 (arXiv:1509.00519), eq. 8; a lower bound in expectation that tightens as k grows.
    The k samples are decoded `k_batch` at a time, drawn from `generator` in that order; the
    log-sum-exp is accumulated across blocks (log-add-exp of each block's log-sum-exp, in float64),
    so k = 5000 needs the memory of k_batch samples and stays exact where the weights span
    hundreds of nats.
    """
    mu, log_var = model.encode(x)
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    for start in range(0, k, k_batch):
        kc = min(k_batch, k - start)
        eps = torch.randn(x.shape[0], kc, mu.shape[1], generator=generator, device=x.device)
        z = VAE.reparameterize(mu, log_var, eps)
        lw = log_weights(model.decode(z), x, z, mu, log_var)  # [B, kc]
        total = torch.logaddexp(total, torch.logsumexp(lw.double(), dim=1))
    return total - math.log(k)


@torch.no_grad()
def evaluate_iwae(
    model: VAE,
    images: torch.Tensor,
    accelerator: Accelerator,
    *,
    seed: int,
    k: int,
    batch_size: int,
    k_batch: int | None = None,
    progress=None,
) -> dict[str, float]:
    """`nll_iwae`: mean over `images` of -log p(x) estimated with k importance samples (nats per example).

    Chunks of `batch_size` examples are dealt round-robin to the processes like `evaluate_elbo`;
    chunk c's samples come from a generator seeded by (seed, c) alone, so any process count gives
    the same estimate. `progress(done, total)` is called after each of this process's chunks.
    """
    acc = accelerator
    was_training = model.training
    model.eval()
    k_batch = k_batch or default_k_batch(k, batch_size)
    n = images.shape[0]
    chunks = range(acc.process_index, math.ceil(n / batch_size), acc.num_processes)
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)  # sum of -log p(x), examples
    gen = torch.Generator(device=acc.device)
    for i, c in enumerate(chunks):
        x = to_unit(images[c * batch_size : (c + 1) * batch_size])
        gen.manual_seed(seed_for(seed, IWAE_STREAM, c))
        sums[0] -= iwae_log_px(model, x, k, k_batch, gen).sum()
        sums[1] += x.shape[0]
        if progress is not None:
            progress(i + 1, len(chunks))
    model.train(was_training)
    sums = acc.reduce(sums, reduction="sum")
    if int(sums[1]) != n:
        raise RuntimeError(f"evaluation counted {int(sums[1])} of {n} examples; every process must call it")
    return {"nll_iwae": (sums[0] / sums[1]).item()}


# ---------------------------------------------------------------- the command
class EvalInputError(ValueError):
    """The model folder, data or an argument is wrong; the message says what was expected."""


def resolve_model_dir(path: str) -> Path:
    """The folder holding model.safetensors + config.json: an exported model (run.dir) or a checkpoint."""
    p = Path(path)
    expected = (
        "an exported model folder (run.dir, holding model.safetensors and config.json) or a checkpoint "
        "folder (run.dir/checkpoints/step-XXXXXXXX)"
    )
    kind = pickle_kind(p) if p.is_file() else None
    if kind:  # by content, whatever the name
        raise EvalInputError(f"{pickle_refusal(p, kind)}; pass {expected}.")
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
    kind = pickle_kind(p / "model.safetensors")  # refused before any data is read
    if kind:
        raise EvalInputError(f"{pickle_refusal(p / 'model.safetensors', kind)}; pass {expected}.")
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
    try:
        # strict (VAE's default too): a missing weight must not stay at its random init.
        model = VAE.from_pretrained(model_dir, strict=True)
    except ModelFileError as err:  # a pickle, a truncated file, foreign weights: names the file
        raise EvalInputError(str(err)) from None
    except Exception as err:  # anything else the loader did not foresee: the same advice
        reason = (str(err).splitlines() or [""])[0][:300]
        raise EvalInputError(
            f"{model_dir} could not be loaded as a vae_dist model ({type(err).__name__}: {reason}); pass a "
            "folder written by vae-train (model.safetensors + config.json)."
        ) from err
    return model.to(device).eval()


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


@quiet_when_the_reader_leaves
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    try:
        check_launch(acc.num_processes)
    except LaunchError as err:
        print(f"vae-evaluate: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    crowded = (
        set_cpu_threads(args.cpu_threads, acc.num_processes, "--cpu-threads") if acc.device.type == "cpu" else None
    )
    try:
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
        model = load_model(model_dir, acc.device)
        _, test = load_data(data_cfg if args.binarize_seed is None else replace(data_cfg, binarize="none"))
        if args.binarize_seed is not None:
            test.images = binarize(test.images, torch.Generator().manual_seed(args.binarize_seed))
        x_dim = model.config_dict["x_dim"]
        if test.images.shape[1] != x_dim:
            raise EvalInputError(
                f"{model_dir} was trained on {x_dim} pixels but {data_cfg.dataset} has {test.images.shape[1]}."
            )
    except (EvalInputError, DataError) as err:
        message = str(err).replace("point data.root at", "point --data-root at")  # the data module's advice
        print(f"vae-evaluate: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if crowded:  # the inputs are good: the evaluation starts, slower than it could
        print(f"vae-evaluate: warning: {crowded}", file=sys.stderr, flush=True)
    images = test.images.to(acc.device)
    k_batch = args.k_batch or default_k_batch(args.k, args.batch_size)

    def progress(done: int, total: int) -> None:
        if acc.is_main_process:
            print(f"iwae k={args.k}: chunk {done}/{total} of process 0, {time.perf_counter() - t0:.0f} s", flush=True)

    elbo = evaluate_elbo(model, images, acc, seed=args.seed, batch_size=args.batch_size)
    iwae = evaluate_iwae(
        model, images, acc, seed=args.seed, k=args.k, batch_size=args.batch_size, k_batch=k_batch, progress=progress
    )
    result = {
        "model": str(model_dir),
        "elbo": elbo["elbo"],
        "recon": elbo["recon"],
        "kl": elbo["kl"],
        "nll_iwae": iwae["nll_iwae"],
        "k": args.k,
        "n_examples": len(test),
        "dataset": data_cfg.dataset,
        "binarize": data_cfg.binarize,
        # the seed of the test set's binarization (None: grayscale)
        "binarize_seed": None
        if data_cfg.binarize == "none"
        else (args.binarize_seed if args.binarize_seed is not None else BINARIZE_SEED),
        "run_config": str(run_config) if run_config else None,  # where unset data options came from
        "seed": args.seed,
        "batch_size": args.batch_size,
        "k_batch": k_batch,
        "seconds": time.perf_counter() - t0,
        "processes": acc.num_processes,
    }
    if acc.is_main_process:
        out = Path(args.out) if args.out else model_dir / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print_table(result)
        print(f"wrote {out}")
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
