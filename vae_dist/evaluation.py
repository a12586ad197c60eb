"""Exact, topology-independent evaluation of a VAE on a split: the ELBO and the IWAE estimate of log p(x).

The split is cut into fixed chunks of `batch_size` examples, dealt round-robin to the processes;
per-example sums are reduced once at the end. Every example is counted exactly once (no padding,
unlike a padded distributed sampler), and chunk c's noise comes from a generator seeded by
(seed, c) alone, so the result is the same on 1 process or 8. The chunk sizes choose *which* noise
is drawn (not the expectation): keep them fixed to reproduce a number to the last digit.

Used by the trainer (the test split at each evaluation) and by `vae-evaluate` (vae_dist.cli.evaluate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from vae_dist.data import to_unit
from vae_dist.losses import log_weights, loss_terms
from vae_dist.model import VAE
from vae_dist.streams import EVAL_STREAM, IWAE_STREAM, TERMS, seed_for

SAMPLES_PER_FORWARD = 50_000  # default examples x samples decoded at once: ~0.5 GB of fp32 activations


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
    progress: Callable[[int, int], None] | None = None,
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


class TestEvaluation:
    """The trainer's evaluation: the test split's terms per example, with the run's seed, evaluation
    batch, k and objective, exact on any process count (`evaluate_elbo`)."""

    def __init__(self, cfg, accelerator: Accelerator, images: torch.Tensor):
        self.cfg, self.acc, self.images = cfg, accelerator, images

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        m, t = self.cfg.model, self.cfg.train
        return evaluate_elbo(
            model, self.images, self.acc, seed=t.seed, batch_size=t.eval_batch_size, k=m.k, objective=m.objective
        )
