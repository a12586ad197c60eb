"""Model and objective against the reference formula. Run: pytest tests/test_model.py"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from vae_dist.model import VAE, loss_terms


def reference_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The original script's ELBO_loss per example: sigmoid decoder + binary_cross_entropy + KLD."""
    enc, dec = model.encoder, model.decoder
    h = enc(x)
    mu, log_var = model.mu(h), model.log_var(h)
    z = mu + torch.exp(0.5 * log_var) * eps
    recon_x = torch.sigmoid(dec(z))
    out = []
    for i in range(x.shape[0]):
        bce = F.binary_cross_entropy(recon_x[i], x[i], reduction="sum")
        kld = -0.5 * torch.sum(1 + log_var[i] - mu[i].pow(2) - log_var[i].exp())
        out.append(bce + kld)
    return torch.stack(out)


def test_architecture_matches_reference() -> None:
    model = VAE(784, [512, 256], 2)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [
        (512, 784),
        (512,),
        (256, 512),
        (256,),
        (2, 256),
        (2,),
        (2, 256),
        (2,),
        (256, 2),
        (256,),
        (512, 256),
        (512,),
        (784, 512),
        (784,),
    ]


def test_loss_equals_reference_formula() -> None:
    torch.manual_seed(0)
    model = VAE(784, [512, 256], 2)
    x = torch.rand(16, 784)
    eps = torch.randn(16, 1, 2)
    terms = loss_terms(model, x, eps)
    ref = reference_loss(model, x, eps[:, 0])
    assert torch.allclose(terms["elbo"], ref, rtol=1e-5, atol=0)
    assert torch.allclose(terms["loss"], terms["recon"] + terms["kl"])
    assert terms["elbo"].shape == (16,)


def test_iwae_with_one_sample_is_the_single_sample_elbo() -> None:
    """With k = 1 the IWAE bound is log p(x|z) + log p(z) - log q(z|x) at the same z (Burda et al. 2016)."""
    torch.manual_seed(1)
    model = VAE(784, [64, 32], 3)
    x = torch.rand(8, 784)
    eps = torch.randn(8, 1, 3)
    iwae = loss_terms(model, x, eps, "iwae")["loss"]
    mu, log_var = model.encode(x)
    z = mu + torch.exp(0.5 * log_var) * eps[:, 0]
    log_q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    recon = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="none").sum(-1)
    assert torch.allclose(iwae, recon + log_q - log_p, rtol=1e-5)


def test_iwae_bound_is_tighter_on_average() -> None:
    torch.manual_seed(2)
    model = VAE(784, [64, 32], 3)
    x = torch.rand(32, 784)
    one = loss_terms(model, x, torch.randn(32, 1, 3), "iwae")["loss"].mean()
    many = loss_terms(model, x, torch.randn(32, 200, 3), "iwae")["loss"].mean()
    assert many < one


def test_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = VAE(784, [64, 32], 5)
    model.save_pretrained(tmp_path)
    loaded = VAE.from_pretrained(tmp_path)
    assert loaded.z_dim == 5
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["config"]) == {"x_dim": 784, "hidden_dims": [64, 32], "z_dim": 5}
    assert json.loads((tmp_path / "config.json").read_text())["z_dim"] == 5


def test_log_var_is_clamped_to_a_finite_range() -> None:
    model = VAE(784, [8], 2)
    with torch.no_grad():
        model.log_var.bias.fill_(1e4)
    terms = loss_terms(model, torch.rand(4, 784), torch.randn(4, 1, 2))
    assert all(math.isfinite(v) for v in terms["kl"].tolist())
