"""The batch plan: which training examples each micro-batch of each optimizer step takes.

The batch plan: epoch e's order is one permutation of the N training examples, drawn on the CPU from
(train.seed, e), the same on every rank, device and process count. Global batch s is the slice
[s*G, (s+1)*G) of it; micro-batch m of rank r takes positions [(m*P + r) * micro, ... + micro) of that
global batch: one gather an epoch, no DataLoader, no host-to-device copy per step. Each epoch
uses floor(N / G) global batches (MNIST's 60,000 at batch 100: all of them); the last N mod G of
each permutation sit that epoch out (a different set each epoch), so that every step has the same
shape, which a graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vae_dist.streams import ORDER_STREAM, seed_for


@dataclass
class BatchPlan:
    """Which training examples each micro-batch of each optimizer step takes (see the module docstring)."""

    n: int  # training examples
    batch_size: int  # global batch G
    micro: int  # examples per process per forward
    accum: int  # micro-batches per process per optimizer step
    rank: int
    world: int  # processes P
    seed: int
    device: torch.device

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def epoch(self, epoch: int) -> torch.Tensor:
        """This rank's indices for every step of `epoch`: int64 [steps, accum, micro] on the device."""
        g = torch.Generator().manual_seed(seed_for(self.seed, ORDER_STREAM, epoch))
        order = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.batch_size]
        ours = order.view(self.steps_per_epoch, self.accum, self.world, self.micro)[:, :, self.rank]
        return ours.contiguous().to(self.device)

    def this_rank(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows [accum, micro, ...] of a tensor [G, ...] drawn for the whole global batch."""
        return batch.view(self.accum, self.world, self.micro, *batch.shape[1:])[:, self.rank]

    @classmethod
    def of(cls, cfg, accelerator, n: int, micro: int, accum: int) -> BatchPlan:
        """The plan of this process for `n` training examples, micro-batches of `micro`, `accum` a step."""
        rank, world = accelerator.process_index, accelerator.num_processes
        return cls(n, cfg.train.batch_size, micro, accum, rank, world, cfg.train.seed, accelerator.device)
