"""Exact, topology-independent evaluation of a VAE on a split.

The split is cut into fixed chunks of `batch_size` examples, dealt round-robin to the processes;
per-example sums are reduced once at the end. Every example is counted exactly once (no padding,
unlike a padded distributed sampler), and chunk c's noise comes from a generator seeded by
(seed, c) alone, so the result is the same on 1 process or 8.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from vae_dist.data import to_unit
from vae_dist.model import loss_terms

TERMS = ("loss", "elbo", "recon", "kl")
EVAL_STREAM = 2  # noise stream id; training uses 1 (see trainer.seed_for)


def seed_for(seed: int, stream: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, stream, step or chunk): streams never share noise."""
    return ((seed * 1_000_003 + stream) * 1_000_000_007 + index) % (2**63)


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
    sums = acc.reduce(sums, reduction="sum")
    if int(sums[-1]) != n:
        raise RuntimeError(f"evaluation counted {int(sums[-1])} of {n} examples; every process must call it")
    return {t: (sums[i] / sums[-1]).item() for i, t in enumerate(TERMS)}
