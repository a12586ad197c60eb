"""Names shared along the data flow: the loss terms every record reports, and the seed streams that
every random draw of a run comes from.

The step, evaluation and figures import them from here (and from nothing further down the flow), so
two draws never share noise by accident: each has its own stream. A number is reproducible to the
last digit from (train.seed, stream, index) alone, whatever the process count or device.
"""

from __future__ import annotations

# The per-example terms `model.loss_terms` returns, in the order of every device-side sum and record.
TERMS = ("loss", "elbo", "recon", "kl")

# Streams of `seed_for(train.seed, stream, index)`.
TRAIN_STREAM = 1  # index: the optimizer step; the noise (and dynamic binarization) of that step
EVAL_STREAM = 2  # index: the evaluation chunk; the ELBO's noise
IWAE_STREAM = 3  # index: the evaluation chunk; the importance samples of the log-likelihood estimate
ORDER_STREAM = 4  # index: the epoch; that epoch's data order

# Figures seed plain generators with train.seed + offset (their draws are fixed for a whole run).
FIGURE_EXAMPLES = 101  # the test examples in recon.png
FIGURE_NOISE = 102  # the prior draws in prior.png


def seed_for(seed: int, stream: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, stream, step or chunk): streams never share noise."""
    return ((seed * 1_000_003 + stream) * 1_000_000_007 + index) % (2**63)
