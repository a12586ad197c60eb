"""The reference MNIST VAE (MLP encoder -> (mu, log sigma^2), decoder -> Bernoulli logits) and its bounds.

Loss terms follow Kingma & Welling 2014 (arXiv:1312.6114), appendix B: reconstruction is the
Bernoulli negative log-likelihood summed over the 784 pixels, KL(q(z|x) || N(0, I)) is analytic.
IWAE is Burda et al. 2016 (arXiv:1509.00519), eq. 8. Every value is in nats *per example*.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import nn

# log sigma^2 is clamped here: sigma in [3e-7, 2.2e4] keeps exp() finite in fp16 and bf16 and is
# far outside anything a trained model uses (|log sigma^2| < 10 on MNIST).
LOG_VAR_MIN, LOG_VAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2 * math.pi)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module, PyTorchModelHubMixin):
    """encode / reparameterize / decode. `VAE.from_pretrained(dir)` loads an exported model."""

    def __init__(self, x_dim: int = 784, hidden_dims: list[int] = (512, 256), z_dim: int = 2):
        super().__init__()
        hidden_dims = list(hidden_dims)
        self.config_dict = {"x_dim": x_dim, "hidden_dims": hidden_dims, "z_dim": z_dim}
        self.z_dim = z_dim
        self.encoder = nn.Sequential(_mlp([x_dim, *hidden_dims]), nn.ReLU())
        self.mu = nn.Linear(hidden_dims[-1], z_dim)
        self.log_var = nn.Linear(hidden_dims[-1], z_dim)
        self.decoder = _mlp([z_dim, *reversed(hidden_dims), x_dim])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters, in fp32 whatever the autocast dtype, so the KL and noise stay exact."""
        h = self.encoder(x)
        log_var = self.log_var(h).float().clamp(LOG_VAR_MIN, LOG_VAR_MAX)
        return self.mu(h).float(), log_var

    @staticmethod
    def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps. `eps` is [B, k, z]; the caller owns the noise so it can be made
        independent of which process or micro-batch handles an example."""
        return mu.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits over the pixels; apply sigmoid only to make pictures."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var, eps)
        return self.decode(z), mu, log_var

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors with the model config in its metadata, so the file alone rebuilds the model."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(
            state,
            str(Path(save_directory) / "model.safetensors"),
            metadata={"format": "pt", "config": json.dumps(self.config_dict)},
        )


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) summed over pixels, in fp32: [B, k, D] logits against [B, D] targets -> [B, k]."""
    target = x.float().unsqueeze(1).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(-1)


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(0, I)) summed over z: Kingma & Welling 2014, appendix B. [B]."""
    return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)


def log_weights(logits, x, z, mu, log_var) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for each of the k samples: [B, k]."""
    log_px_z = -bernoulli_nll(logits, x)
    log_pz = -0.5 * (z.float().pow(2) + LOG_2PI).sum(-1)
    eps_sq = (z.float() - mu.unsqueeze(1)).pow(2) / log_var.exp().unsqueeze(1)
    log_qz = -0.5 * (eps_sq + log_var.unsqueeze(1) + LOG_2PI).sum(-1)
    return log_px_z + log_pz - log_qz


def loss_terms(
    model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, objective: str = "elbo"
) -> dict[str, torch.Tensor]:
    """Per-example terms [B], in nats: `loss` (what is minimised), `elbo` (= -ELBO), `recon`, `kl`.

    elbo: recon averaged over the k samples + analytic KL (k = 1 is the reference loss).
    iwae: -log (1/k) sum_k w_k, the importance-weighted bound; recon and kl are still reported.
    """
    logits, mu, log_var = model(x, eps)  # through forward(), so a DDP wrapper sees the call
    recon = bernoulli_nll(logits, x)  # [B, k]
    kl = gaussian_kl(mu, log_var)
    terms = {"recon": recon.mean(1), "kl": kl}
    terms["elbo"] = terms["recon"] + kl
    if objective == "iwae":
        z = VAE.reparameterize(mu, log_var, eps)  # the z forward() decoded: same inputs, same values
        lw = log_weights(logits, x, z, mu, log_var)
        terms["loss"] = -(torch.logsumexp(lw, dim=1) - math.log(lw.shape[1]))
    else:
        terms["loss"] = terms["elbo"]
    return terms
