"""The model and its optimizer, built alike on every rank and prepared by Accelerate; whether the step
is captured as a CUDA graph (vae_dist.step), and the side stream its recipe asks for."""

from __future__ import annotations

import contextlib

import torch

from vae_dist.model import VAE


def wants_graphs(mode: str, device: torch.device, precision: str, compile: bool) -> bool:
    """Whether train.cuda_graphs=`mode` asks for a capture on this device and precision."""
    return mode != "off" and device.type == "cuda" and precision != "fp16" and not compile


@contextlib.contextmanager
def side_stream():
    """Run the block on a fresh CUDA stream that waits for the current one, and make the current one
    wait for it after: where PyTorch's capture recipe wants warm-up steps and DDP's construction."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def prepare(accelerator, model, optimizer, graphs: bool):
    """`accelerator.prepare(model, optimizer)`; under DDP with graphs, DDP is built on a side stream,
    as PyTorch's recipe for capturing DDP asks."""
    with side_stream() if graphs and accelerator.num_processes > 1 else contextlib.nullcontext():
        return accelerator.prepare(model, optimizer)


def build_model_and_optimizer(cfg, accelerator, x_dim: int, graphs: bool, pixel_means: torch.Tensor | None = None):
    """The VAE (the same initial weights on every rank and topology, from train.seed) and its Adam,
    prepared by Accelerate (DDP on several processes) and compiled where train.compile asks.

    With model.init_output_bias the decoder's output bias starts at the logit of `pixel_means` [784],
    the training split's mean pixels: every rank holds the whole split and computes them alike
    (`pixel_means`), so the initial weights stay the same on every rank.

    Fused Adam (one kernel over all parameters) on CPU and CUDA: on the 2-core CPU it takes 0.5 ms a
    step where the default per-tensor loop takes 1.2 ms and foreach 1.4 ms. On CUDA the learning rate
    is a device tensor, which a graph reads at replay; eager steps use it too, so that a graphed run,
    one that fell back to eager and train.cuda_graphs=off do the same arithmetic (the kernel rounds a
    float32 tensor lr and a Python float differently). Adam is capturable only while capturing
    (`TrainStep.capture`): torch warns that a capturable eager step is slower."""
    dev = accelerator.device
    torch.manual_seed(cfg.train.seed)
    arch = {"activation": cfg.model.activation} if cfg.model.activation != "relu" else {}
    model = VAE(x_dim=x_dim, hidden_dims=cfg.model.hidden_dims, z_dim=cfg.model.z_dim, **arch)
    if cfg.model.init_output_bias:
        if pixel_means is None:
            raise ValueError("model.init_output_bias needs the training split's pixel means (pixel_means).")
        model.init_output_bias(pixel_means)
    model = model.to(dev)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=torch.tensor(cfg.optim.lr, device=dev) if dev.type == "cuda" else cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=True,
    )
    model, optimizer = prepare(accelerator, model, optimizer, graphs)
    if cfg.train.compile:
        model = torch.compile(model, mode=cfg.train.compile_mode)
    return model, optimizer


def pixel_means(images: torch.Tensor) -> torch.Tensor:
    """Mean of each pixel over a split, in [0, 1] (float64 [D]) from uint8 [N, D] (0..255, or 0/255 when
    binarized). Under dynamic binarization the expected binary pixel is the grayscale mean: the same."""
    return images.double().mean(0) / 255
