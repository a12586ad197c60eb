"""The reference MNIST VAE (MLP encoder -> (mu, log sigma^2), decoder -> Bernoulli logits) and its bounds.

Loss terms follow Kingma & Welling 2014 (arXiv:1312.6114), appendix B: reconstruction is the
Bernoulli negative log-likelihood summed over the 784 pixels, KL(q(z|x) || N(0, I)) is analytic.
IWAE is Burda et al. 2016 (arXiv:1509.00519), eq. 8. Every value is in nats *per example*.

`VAE.from_pretrained(folder)` loads `model.safetensors` with safetensors only: a pickle is refused
whatever its name (unpickling can run arbitrary code), the weights must fit the architecture of
`config.json` exactly (strict=True by default), and every problem with the files is one
`ModelFileError` whose message names the file and what to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vae_dist.files import pickle_kind, pickle_refusal

# log sigma^2 is clamped here: sigma in [3e-7, 2.2e4] keeps exp() finite in fp16 and bf16 and is
# far outside anything a trained model uses (|log sigma^2| < 10 on MNIST).
LOG_VAR_MIN, LOG_VAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2 * math.pi)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOAD_ADVICE = "pass a folder written by vae-train or VAE.save_pretrained (model.safetensors + config.json)"


# The README.md that save_pretrained writes beside the weights. huggingface_hub's default card says the
# model "has been pushed to the Hub", which a run.dir never was; this one says what the folder holds.
MODEL_CARD = """---
{{ card_data }}
---

# Variational autoencoder (vae_dist)

A VAE as in Kingma & Welling 2014 (arXiv:1312.6114) for 28 x 28 images (MNIST, Fashion-MNIST or
KMNIST: `data.dataset` in the run's config.yaml): an MLP encoder to the mean and log-variance of
q(z|x), a decoder to Bernoulli logits over the pixels. `config.json` holds the architecture,
`model.safetensors` the weights (the architecture is also in its metadata). Written by `vae-train`
at the end of a run, or by `VAE.save_pretrained`.

```python
from vae_dist.model import VAE
model = VAE.from_pretrained("path/to/this/folder")  # strict: every weight of config.json's architecture
```

In a run directory, `config.yaml` beside this file is the training config and `metrics.jsonl` the
train and test losses (nats per example) of the run that wrote it.
"""


class ModelFileError(ValueError):
    """An exported model cannot be loaded: a missing file, a pickle, a truncated or corrupt safetensors
    file, or weights of another architecture. The message names the file and says what to do."""


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
# The decoder's output bias, when initialised from the data (VAE.init_output_bias), is the logit of
# the training pixel means clipped to [OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP]: a pixel never on (or
# always on) in the training split would otherwise start at -inf (+inf). logit(1e-3) = -6.9.
OUTPUT_BIAS_CLIP = 1e-3


def _mlp(dims: list[int], activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def output_bias_from_data(pixel_means: torch.Tensor) -> torch.Tensor:
    """logit(p) of the pixel means `p` [D] in [0, 1], clipped to [OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP]
    (float64): the output bias with which a decoder whose other outputs are 0 predicts the mean pixel."""
    p = pixel_means.double().clamp(OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP)
    return torch.log(p) - torch.log1p(-p)


class VAE(
    nn.Module, PyTorchModelHubMixin, model_card_template=MODEL_CARD, library_name="vae_dist", tags=["vae", "mnist"]
):
    """encode / reparameterize / decode. `VAE.from_pretrained(dir)` loads an exported model."""

    def __init__(self, x_dim: int = 784, hidden_dims: list[int] = (512, 256), z_dim: int = 2, activation: str = "relu"):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: must be one of {', '.join(ACTIVATIONS)}.")
        self.config_dict = {"x_dim": x_dim, "hidden_dims": hidden_dims, "z_dim": z_dim}
        if activation != "relu":  # models saved before the key existed are ReLU networks; their files stay as they were
            self.config_dict["activation"] = activation
        self.z_dim = z_dim
        self.encoder = nn.Sequential(_mlp([x_dim, *hidden_dims], activation), ACTIVATIONS[activation]())
        self.mu = nn.Linear(hidden_dims[-1], z_dim)
        self.log_var = nn.Linear(hidden_dims[-1], z_dim)
        self.decoder = _mlp([z_dim, *reversed(hidden_dims), x_dim], activation)

    @torch.no_grad()
    def init_output_bias(self, pixel_means: torch.Tensor) -> None:
        """Start the decoder's output bias at the logit of the training pixel means (`output_bias_from_data`),
        as the IWAE authors' code (yburda/iwae) does: the first steps then need not learn the mean image."""
        bias = self.decoder[-1].bias
        bias.copy_(output_bias_from_data(pixel_means).to(bias.dtype))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters, in fp32 whatever the autocast dtype, so the KL and noise stay exact."""
        h = self.encoder(x)
        log_var = self.log_var(h).float().clamp(LOG_VAR_MIN, LOG_VAR_MAX)
        return self.mu(h).float(), log_var

    @staticmethod
    def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, for `eps` [B, k, z] (k samples) or [B, z] (one). The caller owns the
        noise so it can be made independent of which process or micro-batch handles an example."""
        std = torch.exp(0.5 * log_var)
        return mu + std * eps if eps.dim() == 2 else mu.unsqueeze(1) + std.unsqueeze(1) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits over the pixels; apply sigmoid only to make pictures."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, z_grad_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of z = mu + sigma * eps: [B, k, D] for `eps` [B, k, z], [B, D] for one sample [B, z];
        and q's (mu, log_var). `z_grad_scale` [B, k] (DReG, `loss_terms`): the gradient reaching each
        z from the decoder is multiplied by it in the backward pass; it is filled after this forward."""
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var, eps)
        if z_grad_scale is not None:
            z = ScaleGrad.apply(z, z_grad_scale)
        if z.dim() == 2:
            return self.decode(z), mu, log_var
        # The k samples are decoded as one [B * k, z] batch: a 2-D Linear is one addmm, where a 3-D
        # input takes a matmul and a separate bias add.
        return self.decode(z.flatten(0, 1)).view(*z.shape[:2], -1), mu, log_var

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors with the model config in its metadata, so the file alone rebuilds the model."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(
            state,
            str(Path(save_directory) / "model.safetensors"),
            metadata={"format": "pt", "config": json.dumps(self.config_dict)},
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> VAE:
        """Load an exported model: a folder (run.dir or a checkpoint), its model.safetensors, or a Hub id.

        strict=True (default): every weight of the architecture in config.json, with its shape, and no
        other. Raises ModelFileError (a ValueError) for a missing file, a pickle (whatever its name), a
        truncated or corrupt safetensors file, an invalid config.json or weights of another architecture.
        A name that is no local path but could be a Hub id ("owner/name") is asked of the Hub once
        (_ask_hub); one the Hub does not have, or any while the Hub cannot be reached and the local
        Hub cache has no copy, is a ModelFileError that names both places tried.
        """
        source = Path(pretrained_model_name_or_path)
        if source.is_file():
            kind = pickle_kind(source)
            if kind:
                raise ModelFileError(f"{pickle_refusal(source, kind)}; {LOAD_ADVICE}.")
            if source.name != WEIGHTS_NAME:
                raise ModelFileError(f"{source} is a file, not a model folder; {LOAD_ADVICE}.")
            source = source.parent
        offline = None  # why the Hub was not asked, when it was not
        if not source.exists():
            name = str(pretrained_model_name_or_path)
            if not _is_hub_id(name):
                raise ModelFileError(f"model folder {source} does not exist (in {Path.cwd()}); {LOAD_ADVICE}.")
            offline = _ask_hub(name, kwargs.get("revision"), kwargs.get("token"))
            if offline:
                kwargs["local_files_only"] = True
            elif kwargs.get("local_files_only"):
                offline = "local_files_only=True"
        model_id = str(source) if source.is_dir() else str(pretrained_model_name_or_path)
        try:
            return super().from_pretrained(model_id, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # config.json, read by the mixin
            raise ModelFileError(f"{source / CONFIG_NAME} is not valid JSON ({err}); {LOAD_ADVICE}.") from None
        except LocalEntryNotFoundError:  # the mixin's config.json, from the cache only
            raise ModelFileError(
                f"{model_id} is neither a folder or file in {Path.cwd()} nor a model in the local Hugging Face "
                f"cache, and the Hub could not be asked ({offline or 'it stopped answering'}); {LOAD_ADVICE}."
            ) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> VAE:
        """PyTorchModelHubMixin's hook, replaced: safetensors only (the mixin falls back to a pickled
        pytorch_model.bin), strict by default (the mixin's strict=False leaves a missing weight at its
        random init), and one ModelFileError naming the file for anything wrong with it."""
        if Path(model_id).is_dir():
            file = Path(model_id) / WEIGHTS_NAME
            if not file.is_file():
                raise ModelFileError(f"{Path(model_id)} holds no {WEIGHTS_NAME}; {LOAD_ADVICE}.")
        else:
            try:
                file = Path(
                    hf_hub_download(
                        repo_id=model_id,
                        filename=WEIGHTS_NAME,
                        revision=revision,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        token=token,
                        local_files_only=local_files_only,
                    )
                )
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
                raise ModelFileError(
                    f"{model_id} is neither a local folder nor a Hub model with a {WEIGHTS_NAME} "
                    f"({type(err).__name__}); {LOAD_ADVICE}. A pickled pytorch_model.bin is never loaded."
                ) from None
        kind = pickle_kind(file)
        if kind:
            raise ModelFileError(
                f"{pickle_refusal(file, kind)}. Convert it to safetensors where you trust its origin, or {LOAD_ADVICE}."
            )
        try:
            with safe_open(str(file), "pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise ModelFileError(
                f"{file} is not a readable safetensors file ({reason}; truncated or corrupt?); {LOAD_ADVICE}."
            ) from None
        if not any(k in model_kwargs for k in ("x_dim", "hidden_dims", "z_dim")):  # no config.json
            model_kwargs = {**_metadata_config(metadata), **model_kwargs}
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ModelFileError(
                f"the config of {file} ({CONFIG_NAME} or the file's metadata) does not build a VAE ({err}); "
                f"{LOAD_ADVICE}."
            ) from None
        problems = state_problems(model.state_dict(), state, strict=strict)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ModelFileError(
                f"{file} holds weights of another architecture than VAE({_kwargs_text(model.config_dict)}) "
                f"({shown}); load it with the config it was trained with (its {CONFIG_NAME}), or another file."
            )
        model.load_state_dict(state, strict=strict)
        return model.to(map_location).eval()


def _ask_hub(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """Ask the Hub once whether `repo_id` holds a model.safetensors: None when it does (the download
    goes on as usual), why the Hub could not be asked when it could not (offline mode, no network:
    the caller then reads the local cache only), and ModelFileError when the Hub answers that there is
    no such model. One request, never retried: without a network huggingface_hub retries its
    requests for about 26 s before it falls back to its cache, and a mistyped local path, which looks
    like a Hub id ("runs/typo"), should not wait for that."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, WEIGHTS_NAME, revision=revision), token=token)
    except GatedRepoError:  # it exists, behind an access request: the download's own error says how
        return None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelFileError(
            f"{repo_id} is neither a folder or file in {Path.cwd()} nor a model with a {WEIGHTS_NAME} on the "
            f"Hugging Face Hub ({constants.ENDPOINT} answered {type(err).__name__}; a private model needs "
            f"`hf auth login` or token=); {LOAD_ADVICE}."
        ) from None
    except HfHubHTTPError:  # the Hub answered something else (a server error): the download reports it
        return None
    except Exception as err:  # no network, DNS, a proxy: the library's own exception types vary by version
        return f"{constants.ENDPOINT} could not be reached: {type(err).__name__}: {str(err)[:120]}"
    return None


def _is_hub_id(text: str) -> bool:
    """Whether `text` could name a Hub model ("owner/name"); a local path that does not exist cannot."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _metadata_config(metadata: dict[str, str]) -> dict:
    """The model config that _save_pretrained stores in the safetensors metadata, or {}."""
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _kwargs_text(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def state_problems(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], strict: bool = True, found_in: str = "file"
) -> list[str]:
    """Every tensor of `found` that does not fit `expected`: missing and unexpected keys (strict only)
    and wrong shapes, each as "<key>: ..." (`found_in` names where `found` came from); [] when the
    state dict loads."""
    problems = []
    if strict:
        problems += [f"{k}: missing" for k in expected if k not in found]
        problems += [f"{k}: unexpected" for k in found if k not in expected]
    problems += [
        f"{k}: {found_in} {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    return problems


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


class ScaleGrad(torch.autograd.Function):
    """z -> z in the forward pass; in the backward the gradient is multiplied by `scale`, a tensor of
    z's leading shape [B, k] that the caller fills in place after the forward (DReG's weights depend on
    the decoder's output). `scale` is held as an attribute, not saved for backward, so that filling it
    is no in-place error; both passes are device kernels only, which a CUDA graph captures."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale.unsqueeze(-1).to(grad.dtype), None


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
