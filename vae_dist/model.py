"""The reference MNIST VAE: an MLP encoder to (mu, log sigma^2) of q(z|x), a decoder to Bernoulli logits.

Its bounds are in losses.py; its files (`save_pretrained`, `VAE.from_pretrained(folder)`: safetensors
only, strict, one `ModelFileError` naming the file) in model_files.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from vae_dist import model_files
from vae_dist.model_files import ModelFileError as ModelFileError  # what from_pretrained raises

# log sigma^2 is clamped here: sigma in [3e-7, 2.2e4] keeps exp() finite in fp16 and bf16 and is
# far outside anything a trained model uses (|log sigma^2| < 10 on MNIST).
LOG_VAR_MIN, LOG_VAR_MAX = -30.0, 20.0


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
        and q's (mu, log_var). `z_grad_scale` [B, k] (DReG, `losses.loss_terms`): the gradient reaching each
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
        """PyTorchModelHubMixin's hook: model.safetensors, the config in its metadata (model_files)."""
        model_files.write_weights(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> VAE:
        """Load an exported model: a folder (run.dir or a checkpoint), its model.safetensors, or a Hub id.

        strict=True (default): every weight of the architecture in config.json, with its shape, and no
        other. Raises ModelFileError (a ValueError) for a missing file, a pickle (whatever its name), a
        truncated or corrupt safetensors file, an invalid config.json or weights of another architecture.
        A name that is no local path but could be a Hub id ("owner/name") is asked of the Hub once
        (model_files.locate); one the Hub does not have, or any while the Hub cannot be reached and the
        local Hub cache has no copy, is a ModelFileError that names both places tried.
        """
        model_id, offline = model_files.locate(pretrained_model_name_or_path, kwargs)
        if offline:  # the Hub was not asked: the local cache only
            kwargs["local_files_only"] = True
        with model_files.config_errors(model_id, offline):
            return super().from_pretrained(model_id, **kwargs)

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
        file = model_files.weights_file(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        return model_files.load(cls, file, model_kwargs, strict=strict).to(map_location).eval()


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
