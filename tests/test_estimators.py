"""The recipe features of the IWAE paper's setting on a tiny model with fixed seeds: the tanh network,
the output bias from the data, the KL weight of warm-up, and the STL and DReG gradient estimators
(Roeder et al. 2017; Tucker et al. 2018). Run: pytest tests/test_estimators.py"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vae_dist.losses import log_weights, loss_terms
from vae_dist.model import OUTPUT_BIAS_CLIP, VAE, output_bias_from_data

X_DIM, Z_DIM = 6, 3


def tiny(seed: int = 0, activation: str = "tanh") -> VAE:
    torch.manual_seed(seed)
    return VAE(x_dim=X_DIM, hidden_dims=[8], z_dim=Z_DIM, activation=activation)


def binary_x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, X_DIM, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


def grads(model: VAE, x: torch.Tensor, eps: torch.Tensor, objective: str, estimator: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_terms(model, x, eps, objective, estimator)["loss"].sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def encoder_vector(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for n, v in g.items() if not n.startswith("decoder.")])


# ---------------------------------------------------------------- network and initialisation
def test_tanh_network_uses_tanh_and_round_trips(tmp_path) -> None:
    model = tiny(activation="tanh")
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 2  # encoder's hidden, decoder's hidden
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    model.save_pretrained(tmp_path)
    loaded = VAE.from_pretrained(tmp_path)
    assert loaded.config_dict["activation"] == "tanh"
    x, eps = binary_x(), torch.randn(4, Z_DIM)
    assert torch.equal(loaded(x, eps)[0], model(x, eps)[0])


def test_relu_model_config_is_unchanged() -> None:
    """Saved ReLU models keep the config (and safetensors metadata) they had before `activation` existed."""
    assert "activation" not in tiny(activation="relu").config_dict


def test_output_bias_is_the_clipped_logit_of_the_pixel_means() -> None:
    images = torch.tensor([[0, 255, 255, 0, 51, 255], [0, 255, 0, 0, 51, 255]], dtype=torch.uint8)
    means = images.double().mean(0) / 255  # 0, 1, 0.5, 0, 0.2, 1
    model = tiny()
    model.init_output_bias(means)
    p = means.clamp(OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP)
    expected = torch.log(p / (1 - p)).float()
    assert torch.allclose(model.decoder[-1].bias, expected, rtol=0, atol=1e-6)
    assert model.decoder[-1].bias[2].item() == 0.0  # logit(0.5)
    assert model.decoder[-1].bias[0].item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), rel=1e-6)  # clipped
    assert torch.isfinite(output_bias_from_data(means)).all()


def test_trainer_starts_the_bias_from_the_training_split(tiny_overrides: list[str]) -> None:
    from vae_dist.config import load_config
    from vae_dist.data import load_data
    from vae_dist.trainer import Trainer

    cfg = load_config(None, tiny_overrides + ["model.init_output_bias=true", "data.binarize=dynamic"])
    train, _ = load_data(cfg.data)
    trainer = Trainer(cfg)
    try:
        bias = trainer.accelerator.unwrap_model(trainer.model).decoder[-1].bias
        means = (train.images.double().mean(0) / 255).clamp(1e-3, 1 - 1e-3)
        assert torch.allclose(bias.double(), torch.log(means / (1 - means)), atol=1e-6)
    finally:
        trainer.close()


# ---------------------------------------------------------------- KL weight
def test_kl_weight_scales_only_the_loss() -> None:
    model, x = tiny(), binary_x()
    eps = torch.randn(4, 1, Z_DIM)
    plain = loss_terms(model, x, eps)
    half = loss_terms(model, x, eps, kl_weight=torch.tensor(0.5))
    assert torch.allclose(half["loss"], plain["recon"] + 0.5 * plain["kl"])
    for term in ("elbo", "recon", "kl"):  # the true terms, whatever the weight
        assert torch.equal(half[term], plain[term])
    eps = torch.randn(4, 5, Z_DIM)
    iwae = loss_terms(model, x, eps, "iwae", kl_weight=torch.tensor(0.0))
    logits, mu, log_var = model(x, eps)
    # weight 0: -log mean_k p(x | z_k)
    expected = -(
        torch.logsumexp(
            -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, x.unsqueeze(1).expand_as(logits), reduction="none"
            ).sum(-1),
            1,
        )
        - math.log(5)
    )
    assert torch.allclose(iwae["loss"], expected, atol=1e-5)
    assert torch.allclose(
        loss_terms(model, x, eps, "iwae", kl_weight=torch.tensor(1.0))["loss"],
        loss_terms(model, x, eps, "iwae")["loss"],
    )


def test_kl_weight_rises_linearly_over_the_warmup() -> None:
    from vae_dist.config import ModelConfig

    cfg = ModelConfig(kl_warmup_steps=4)
    assert [cfg.kl_weight_at(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert ModelConfig().kl_weight_at(0) == 1.0


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize("objective,k,estimator", [("elbo", 1, "stl"), ("iwae", 5, "stl"), ("iwae", 5, "dreg")])
def test_estimators_change_the_gradient_not_the_terms(objective: str, k: int, estimator: str) -> None:
    model, x = tiny(), binary_x()
    eps = torch.randn(4, k, Z_DIM, generator=torch.Generator().manual_seed(3))
    plain = loss_terms(model, x, eps, objective)
    other = loss_terms(model, x, eps, objective, estimator)
    for term in ("elbo", "recon", "kl"):
        assert torch.allclose(other[term], plain[term], atol=1e-6)
    if objective == "iwae":  # the bound's value itself
        assert torch.allclose(other["loss"], plain["loss"], atol=1e-5)
    else:  # stl: the single-sample -ELBO, log q(z) - log p(x, z)
        logits, mu, log_var = model(x, eps)
        z = VAE.reparameterize(mu, log_var, eps)
        assert torch.allclose(other["loss"], -log_weights(logits, x, z, mu, log_var)[:, 0], atol=1e-5)


@pytest.mark.parametrize("objective,k,estimator", [("elbo", 1, "stl"), ("iwae", 5, "stl"), ("iwae", 5, "dreg")])
def test_path_estimators_stick_the_landing(objective: str, k: int, estimator: str) -> None:
    """q(z|x) = p(z|x) exactly: a decoder that ignores z (zero first weights) makes the posterior the prior
    N(0, I), and an encoder with zero mu and log sigma^2 layers matches it. Then every draw of the path
    estimators' encoder gradient is 0 (Roeder et al. 2017), where IWAE's reparameterisation gradient is not."""
    model, x = tiny(), binary_x()
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        for layer in (model.mu, model.log_var):
            layer.weight.zero_()
            layer.bias.zero_()
    eps = torch.randn(4, k, Z_DIM, generator=torch.Generator().manual_seed(4))
    assert encoder_vector(grads(model, x, eps, objective, estimator)).abs().max() == 0
    if objective == "iwae":
        assert encoder_vector(grads(model, x, eps, "iwae", "reparam")).abs().max() > 1e-3


def test_dreg_decoder_gradient_equals_iwae() -> None:
    model, x = tiny(), binary_x()
    eps = torch.randn(4, 10, Z_DIM, generator=torch.Generator().manual_seed(5))
    iwae, dreg = grads(model, x, eps, "iwae", "reparam"), grads(model, x, eps, "iwae", "dreg")
    for name, g in iwae.items():
        if name.startswith("decoder."):
            assert torch.allclose(dreg[name], g, rtol=1e-5, atol=1e-7), name
    assert not torch.allclose(encoder_vector(dreg), encoder_vector(iwae))  # the encoder's differ per draw


def encoder_draws(estimator: str, k: int, n: int) -> torch.Tensor:
    """n draws [n, encoder parameters] of the encoder gradient, each from its own fixed-seed noise."""
    model, x = tiny(seed=2), binary_x(2)
    gen = torch.Generator().manual_seed(6)
    return torch.stack(
        [encoder_vector(grads(model, x, torch.randn(2, k, Z_DIM, generator=gen), "iwae", estimator)) for _ in range(n)]
    )


@pytest.mark.parametrize("k", [10, 50])
def test_dreg_encoder_gradient_is_iwaes_in_expectation_with_lower_variance(k: int) -> None:
    """Both are unbiased for the IWAE bound's gradient (Tucker et al. 2018): the per-draw difference
    of the two (same noise) averages to zero within 5 standard errors in every component, over 600
    draws; DReG's encoder gradient has under half the total variance (measured: 3% at k = 10, 1.3% at 50)."""
    n = 600
    iwae, dreg = encoder_draws("reparam", k, n), encoder_draws("dreg", k, n)
    diff = dreg - iwae
    moves = diff.std(0) > 0  # weights of a pixel that is 0 in every example get no gradient from either
    assert diff[:, ~moves].abs().max() == 0 and moves.sum() > 20
    z_scores = diff.mean(0)[moves] / (diff.std(0)[moves] / math.sqrt(n))
    assert z_scores.abs().max() < 5, z_scores
    assert dreg.var(0).sum() < 0.5 * iwae.var(0).sum()


# ---------------------------------------------------------------- in the trainer
def train_records(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


@pytest.mark.parametrize("stop_at", [5])
def test_kl_warmup_is_recorded_and_exact_across_resume(tiny_overrides: list[str], tmp_path, stop_at: int) -> None:
    """16 steps with the KL weight rising over 10 (log every 3): the records carry the weight of each
    window's last step, and a run stopped after step 5 and resumed ends with the same weights and records."""
    from safetensors.torch import load_file

    from conftest import train_in_process

    overrides = tiny_overrides + ["model.kl_warmup_steps=10", "tracking.log_every_steps=3"]
    ref = tmp_path / "ref"
    train_in_process(overrides + [f"run.dir={ref}"])
    records = [r for r in train_records(ref) if r["split"] == "train"]
    assert [(r["step"], r["kl_weight"]) for r in records] == [(3, 0.2), (6, 0.5), (9, 0.8), (12, 1.0), (15, 1.0)]
    run = tmp_path / "stopped"
    _, summary = train_in_process(overrides + [f"run.dir={run}"], stop_at=stop_at)
    assert summary["preempted"]
    train_in_process(overrides + [f"run.dir={run}"])
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_records(run) == train_records(ref)


def test_no_warmup_records_no_kl_weight(tiny_overrides: list[str]) -> None:
    from conftest import train_in_process

    trainer, _ = train_in_process(tiny_overrides + ["train.max_steps=2"])
    assert trainer.step_fn.kl_weight is None  # no device tensor, no multiply in the loss
    assert all("kl_weight" not in r for r in train_records(trainer.run_dir))


@pytest.mark.parametrize("objective,estimator", [("elbo", "stl"), ("iwae", "stl"), ("iwae", "dreg")])
def test_estimators_train(tiny_overrides: list[str], objective: str, estimator: str) -> None:
    from conftest import train_in_process

    k = 1 if objective == "elbo" else 4
    extra = [f"model.objective={objective}", f"model.k={k}", f"model.estimator={estimator}", "train.max_steps=6"]
    trainer, summary = train_in_process(tiny_overrides + extra + ["model.activation=tanh", "model.kl_warmup_steps=3"])
    assert math.isfinite(summary["final_test_elbo"]) and summary["steps"] == 6
