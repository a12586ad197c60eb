"""Image grids of a VAE: reconstructions, prior samples, the latent manifold, interpolations.

Every function takes a model, tensors and a path, writes one PNG and returns the path. The model is
read in eval mode without gradients; its training flag is restored afterwards. The decoder returns
Bernoulli logits, and `decode_pixels` is the one place that applies the sigmoid, to show p(x|z) as
grey levels. Grids are written pixel for pixel with torchvision's `save_image`: one 28 x 28 tile
per image, so the same pixels give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

SIDE = 28  # MNIST-family images are 28 x 28
MANIFOLD_N = 20  # manifold.png is MANIFOLD_N x MANIFOLD_N decoder outputs
MANIFOLD_P = (0.05, 0.95)  # z grid spans these N(0, 1) quantiles (about +-1.64), Kingma & Welling 2014, fig. 4
PAD = 2  # pixels between tiles
PAD_VALUE = 0.5  # grey lines between tiles, so black digit backgrounds stay apart


class _Eval:
    """Eval mode and no grad for the block; the model's training flag is restored on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> torch.device:
        self.model.eval()
        self.no_grad.__enter__()
        return next(self.model.parameters()).device

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 0..255 (or float 0..1) [N, 784] -> float32 [N, 784] in [0, 1] on `device`."""
    x = images.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _tiles(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 784] in [0, 1] -> [N, 1, 28, 28] on the CPU, for make_grid."""
    return pixels.detach().float().cpu().reshape(-1, 1, SIDE, SIDE)


def decode_pixels(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """p(x|z) per pixel, [N, 784] in [0, 1]: the sigmoid of the decoder's logits (caller holds no_grad)."""
    return torch.sigmoid(model.decode(z.float()).float())


def encode_means(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Means of q(z|x), [N, z_dim] on the CPU, in chunks of `batch_size` examples."""
    with _Eval(model) as device:
        return torch.cat(
            [
                model.encode(_unit(images[i : i + batch_size], device))[0].cpu()
                for i in range(0, len(images), batch_size)
            ]
        )


def _save(tiles: torch.Tensor, path: Path, nrow: int, padding: int = PAD) -> Path:
    from torchvision.utils import save_image  # here, not at import: ~1.5 s of a run's start-up

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, path, nrow=nrow, padding=padding, pad_value=PAD_VALUE)
    return path


# ------------------------------------------------------------------ image grids
def recon_grid(model: torch.nn.Module, x_uint8: torch.Tensor, path: Path, ncol: int = 10) -> Path:
    """Test inputs above their reconstructions: rows alternate input / sigmoid(decode(mu)), ncol per row.

    Reconstructions decode the mean of q(z|x), so the picture has no sampling noise."""
    with _Eval(model) as device:
        x = _unit(x_uint8, device)
        recon = decode_pixels(model, model.encode(x)[0])
    x, recon = _tiles(x), _tiles(recon)
    rows = []
    for i in range(0, len(x), ncol):
        a, b = x[i : i + ncol], recon[i : i + ncol]
        if len(a) < ncol:  # keep the columns aligned: pad a short last row with blank tiles
            blank = torch.zeros(ncol - len(a), 1, SIDE, SIDE)
            a, b = torch.cat([a, blank]), torch.cat([b, blank])
        rows += [a, b]
    return _save(torch.cat(rows), path, nrow=ncol)


def prior_grid(model: torch.nn.Module, z_fixed: torch.Tensor, path: Path) -> Path:
    """Decoder outputs for fixed prior draws z ~ N(0, I), in a square-ish grid."""
    with _Eval(model) as device:
        pixels = decode_pixels(model, z_fixed.to(device))
    return _save(_tiles(pixels), path, nrow=math.ceil(math.sqrt(len(z_fixed))))


def manifold_z(n: int = MANIFOLD_N) -> torch.Tensor:
    """[n*n, 2] z on a grid of N(0, 1) quantiles; row-major, z1 rising to the right, z2 rising upwards."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(*MANIFOLD_P, n))
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")  # top row = largest z2
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


def latent_manifold(model: torch.nn.Module, path: Path, n: int = MANIFOLD_N) -> Path | None:
    """For z = 2: an n x n grid of decoder outputs over the z plane (Kingma & Welling 2014, fig. 4).

    Returns None (and writes nothing) for other latent sizes."""
    if model.z_dim != 2:
        return None
    with _Eval(model) as device:
        pixels = decode_pixels(model, manifold_z(n).to(device))
    return _save(_tiles(pixels), path, nrow=n, padding=0)


def interpolation_grid(
    model: torch.nn.Module, x_from: torch.Tensor, x_to: torch.Tensor, path: Path, steps: int = 10
) -> Path:
    """One row per pair: input a, decode of `steps` points on the line from mu(a) to mu(b), input b."""
    with _Eval(model) as device:
        a, b = _unit(x_from, device), _unit(x_to, device)
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
        z = mu_a.unsqueeze(1) * (1 - t) + mu_b.unsqueeze(1) * t  # [pairs, steps, z]
        pixels = decode_pixels(model, z.reshape(-1, z.shape[-1])).reshape(len(a), steps, -1)
    rows = torch.cat([a.unsqueeze(1), pixels, b.unsqueeze(1)], dim=1)  # [pairs, steps + 2, 784]
    return _save(_tiles(rows.reshape(-1, rows.shape[-1])), path, nrow=steps + 2)
