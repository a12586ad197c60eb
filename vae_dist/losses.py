"""The bounds a VAE is trained and judged by, per example, in nats.

Loss terms follow Kingma & Welling 2014 (arXiv:1312.6114), appendix B: reconstruction is the
Bernoulli negative log-likelihood summed over the 784 pixels, KL(q(z|x) || N(0, I)) is analytic.
IWAE is Burda et al. 2016 (arXiv:1509.00519), eq. 8. Every value is in nats *per example*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_dist.model import VAE, ScaleGrad

LOG_2PI = math.log(2 * math.pi)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) summed over pixels, in fp32: [B, k, D] logits against [B, D] targets -> [B, k]
    (or [B, D] logits of one sample -> [B])."""
    target = x.float() if logits.dim() == 2 else x.float().unsqueeze(1).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(-1)


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(0, I)) summed over z: Kingma & Welling 2014, appendix B. [B]."""
    return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)


def log_weights(logits, x, z, mu, log_var, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for each of the k samples: [B, k]; with `kl_weight` b,
    log p(x | z_k) + b (log p(z_k) - log q(z_k | x)) (KL warm-up)."""
    log_px_z = -bernoulli_nll(logits, x)
    log_pz = -0.5 * (z.float().pow(2) + LOG_2PI).sum(-1)
    eps_sq = (z.float() - mu.unsqueeze(1)).pow(2) / log_var.exp().unsqueeze(1)
    log_qz = -0.5 * (eps_sq + log_var.unsqueeze(1) + LOG_2PI).sum(-1)
    if kl_weight is not None:
        return log_px_z + kl_weight * (log_pz - log_qz)
    return log_px_z + log_pz - log_qz


def loss_terms(
    model: torch.nn.Module,
    x: torch.Tensor,
    eps: torch.Tensor,
    objective: str = "elbo",
    estimator: str = "reparam",
    kl_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example terms [B], in nats: `loss` (what is minimised), `elbo` (= -ELBO), `recon`, `kl`.

    elbo: recon averaged over the k samples + analytic KL (k = 1 is the reference loss).
    iwae: -log (1/k) sum_k w_k, the importance-weighted bound; recon and kl are still reported.
    `kl_weight` (a 0-dim device tensor, KL warm-up; None = 1, and no multiply): the loss weighs the KL
    (elbo), or log p(z) - log q(z) inside each log weight (iwae, as nbip/IWAE anneals it); `elbo`,
    `recon` and `kl` stay the true terms.
    `estimator` changes the gradient of `loss`, never the true terms:
    - reparam: the plain reparameterisation gradient of the loss above;
    - stl (Roeder et al. 2017, "Sticking the landing"): q's mu and log sigma^2 stopped inside log q, so
      the encoder gets the path derivative only; the KL of the elbo objective is then the single-sample
      estimate log q(z) - log p(z), and `loss` its value. With iwae (k > 1) it is biased (Tucker et
      al. 2018): DReG is the unbiased form;
    - dreg (Tucker et al. 2018, eq. 7; objective iwae): the decoder's gradient is IWAE's, the encoder's
      sum_k w~_k^2 d log w_k / dz_k dz_k/dphi with q's parameters stopped inside log q (w~: normalised
      weights); `loss` keeps the IWAE bound's value.
    """
    if estimator != "reparam":
        return _path_loss_terms(model, x, eps, objective, estimator, kl_weight)
    # The reference loss (elbo, k = 1), every default run's hot path, runs in 2-D: the same numbers
    # without the [B, 1, ...] views' forward and backward nodes (~0.1 ms a step on a 2-core CPU).
    one = objective == "elbo" and eps.shape[1] == 1
    logits, mu, log_var = model(x, eps[:, 0] if one else eps)  # through forward(), so a DDP wrapper sees it
    recon = bernoulli_nll(logits, x)  # [B], or [B, k]
    kl = gaussian_kl(mu, log_var)
    terms = {"recon": recon if one else recon.mean(1), "kl": kl}  # recon averaged over the k samples
    terms["elbo"] = terms["recon"] + kl
    if objective == "iwae":
        z = VAE.reparameterize(mu, log_var, eps)  # the z forward() decoded: same inputs, same values
        lw = log_weights(logits, x, z, mu, log_var, kl_weight)
        terms["loss"] = -(torch.logsumexp(lw, dim=1) - math.log(lw.shape[1]))
    elif kl_weight is not None:
        terms["loss"] = terms["recon"] + kl_weight * kl
    else:
        terms["loss"] = terms["elbo"]
    return terms


def _path_loss_terms(model, x, eps, objective, estimator, kl_weight) -> dict[str, torch.Tensor]:
    """loss_terms for estimator=stl and dreg (see there): always in [B, k, ...] form."""
    if eps.dim() == 2:
        eps = eps.unsqueeze(1)
    dreg = estimator == "dreg"
    # DReG's per-sample weights w~_k, known after the decoder ran: filled below, read by the backward.
    scale = eps.new_empty(eps.shape[:2], dtype=torch.float32) if dreg else None
    logits, mu, log_var = model(x, eps, scale)  # through forward(), so a DDP wrapper sees it
    recon = bernoulli_nll(logits, x)  # [B, k]
    kl = gaussian_kl(mu, log_var)
    terms = {"recon": recon.mean(1), "kl": kl}
    terms["elbo"] = terms["recon"] + kl
    z = VAE.reparameterize(mu, log_var, eps)  # the z forward() decoded, with the same gradient paths
    if dreg:
        z = ScaleGrad.apply(z, scale)
    lw = log_weights(logits, x, z, mu.detach(), log_var.detach(), kl_weight)  # [B, k]: q's parameters stopped
    if objective == "elbo":  # k = 1 (the config allows no other): the single-sample -ELBO
        terms["loss"] = -lw[:, 0]
        return terms
    bound = -(torch.logsumexp(lw, dim=1) - math.log(lw.shape[1]))
    if not dreg:
        terms["loss"] = bound
        return terms
    w = torch.softmax(lw.detach(), dim=1)  # w~_k
    scale.copy_(w)  # z's gradient from every term of log w_k gets a second factor w~_k
    surrogate = -(w * lw).sum(1)  # gradient: -sum_k w~_k d log w_k, the decoder's as IWAE's
    terms["loss"] = bound.detach() + (surrogate - surrogate.detach())  # the bound's value, DReG's gradient
    return terms
