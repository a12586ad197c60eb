"""The loops `vae-bench` times, each training the same 784-512-256-2 VAE with Adam on the same data,
and the data they share. Each loop is a generator: built on the first next(), then one optimizer
step per next(), which returns the number of examples that step trained on; epochs roll over
without end.

  original  the reference script's loop: torchvision MNIST with per-example PIL + ToTensor, a DataLoader,
            sigmoid + BCE loss, `.item()` every step (a re-implementation of the original script's train()).
  minimal   a hand-written loop (re-implemented after the developers' minimal_loop.py, kept outside the
            repository): the whole split as one float tensor on the device, batches by indexing a
            permutation, `.item()` every step (logits loss by default, the toolkit's arithmetic). On a
            GPU its per-step sync makes it no floor.
  floor     the floor of one step (after graph_floor.py, likewise): fused Adam, each batch a slice of
            the epoch's permuted copy, the loss summed on the device, no per-step sync; on CUDA the
            whole step (forward, backward, fused capturable Adam) replayed as one CUDA graph.
  toolkit   a real `vae_dist.trainer.Trainer`, driven through its public loop, as `Trainer.fit` drives
            it: `optimizer_steps()` and the stop checks.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

RANDOM_SHAPE = (60_000, 10_000)  # train, test examples of random data: MNIST's sizes
PIXELS = 784


# ---------------------------------------------------------------- data
@dataclass
class Context:
    """What every variant needs: config, device, data source; the splits are loaded once and shared."""

    cfg: object
    device: object  # torch.device
    args: argparse.Namespace
    real: bool  # data.root holds the IDX files
    trainer: object | None = None  # the toolkit variant's Trainer, once built
    _splits: tuple | None = field(default=None, repr=False)

    def splits(self):
        """(train, test) `vae_dist.data.Split`s: the real files, or seeded random uint8 images."""
        if self._splits is None:
            self._splits = load_or_random(self.cfg.data, self.real)
        return self._splits

    def data_label(self) -> str:
        if self.real:
            return f"{self.cfg.data.dataset} from {self.cfg.data.root}"
        return f"random uint8 images {RANDOM_SHAPE[0]} + {RANDOM_SHAPE[1]} x {PIXELS} ({self.cfg.data.root} has no {self.cfg.data.dataset})"


def has_real_data(data_cfg) -> bool:
    from vae_dist.data import IDX_FILES, raw_folder

    return all((raw_folder(data_cfg) / name).is_file() for name in IDX_FILES)


def load_or_random(data_cfg, real: bool):
    import torch

    from vae_dist.data import Split, load_data

    if real:
        return load_data(data_cfg)
    g = torch.Generator().manual_seed(0)
    return tuple(
        Split(
            images=torch.randint(0, 256, (n, PIXELS), dtype=torch.uint8, generator=g),
            labels=torch.randint(0, 10, (n,), generator=g),
        )
        for n in RANDOM_SHAPE
    )


def torchvision_split(ctx: Context, train: bool, transform):
    """The dataset object the original script iterates: torchvision's own class reading data.root, or,
    for random data, the same class holding the random tensor (its __getitem__, PIL + transform, unchanged)."""
    import torchvision.datasets
    from torchvision.datasets import MNIST

    from vae_dist.data import DATASETS

    cls = getattr(torchvision.datasets, DATASETS[ctx.cfg.data.dataset])
    if ctx.real:
        return cls(root=ctx.cfg.data.root, train=train, transform=transform, download=False)
    split = ctx.splits()[0 if train else 1]
    ds = MNIST.__new__(MNIST)
    super(MNIST, ds).__init__(root=None, transform=transform)  # VisionDataset: transform, no files
    ds.train, ds.data, ds.targets = train, split.images.view(-1, 28, 28), split.labels
    return ds


# ---------------------------------------------------------------- the reference model and loss
def reference_vae(hidden: list[int], z_dim: int):
    """The original script's VAE (fc1..fc6, sigmoid output), as in the original script (reference_vae.py, kept outside the repository)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VAE(nn.Module):
        def __init__(self, x_dim, h_dim1, h_dim2, z_dim):
            super().__init__()
            self.fc1 = nn.Linear(x_dim, h_dim1)
            self.fc2 = nn.Linear(h_dim1, h_dim2)
            self.fc31 = nn.Linear(h_dim2, z_dim)
            self.fc32 = nn.Linear(h_dim2, z_dim)
            self.fc4 = nn.Linear(z_dim, h_dim2)
            self.fc5 = nn.Linear(h_dim2, h_dim1)
            self.fc6 = nn.Linear(h_dim1, x_dim)

        def encoder(self, x):
            h = F.relu(self.fc1(x))
            h = F.relu(self.fc2(h))
            return self.fc31(h), self.fc32(h)

        def sampling(self, mu, log_var):
            std = torch.exp(0.5 * log_var)
            eps = torch.randn_like(std)
            return eps.mul(std).add_(mu)

        def logits(self, z):
            return self.fc6(F.relu(self.fc5(F.relu(self.fc4(z)))))

        def decoder(self, z):
            return torch.sigmoid(self.logits(z))

        def forward(self, x, logits: bool = False):
            mu, log_var = self.encoder(x.view(-1, PIXELS))
            z = self.sampling(mu, log_var)
            return (self.logits(z) if logits else self.decoder(z)), mu, log_var

    return VAE(PIXELS, hidden[0], hidden[1], z_dim)


def elbo_loss(out, x, mu, log_var, logits: bool = False):
    """The original ELBO_loss (BCE summed over pixels + analytic KL, summed over the batch), in fp32."""
    import torch
    import torch.nn.functional as F

    x = x.view(-1, PIXELS)
    out, mu, log_var = out.float(), mu.float(), log_var.float()
    if logits:
        bce = F.binary_cross_entropy_with_logits(out, x, reduction="sum")
    else:
        bce = F.binary_cross_entropy(out, x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())


class Precision:
    """Autocast (+ a GradScaler for fp16) for the two hand-written loops, matching train.precision."""

    def __init__(self, device, precision: str):
        import torch

        self.device_type = device.type
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        # No weight cache, as PyTorch's CUDA Graphs notes advise for captured autocast regions (the
        # floor captures this); each weight is cast once a forward in these models anyway.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)

    def backward(self, loss) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt) -> None:
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()


# ---------------------------------------------------------------- the variants
# Each is a generator: built on the first next(), then one optimizer step per next(), which returns
# the number of examples that step trained on. Epochs roll over without end.
def original_loop(ctx: Context) -> Iterator[int]:
    """(a) reference_vae.py's train(): DataLoader over torchvision MNIST with ToTensor, .item() every step."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    cfg, dev = ctx.cfg, ctx.device
    torch.manual_seed(cfg.train.seed)
    train = torchvision_split(ctx, True, transforms.ToTensor())
    test = torchvision_split(ctx, False, transforms.ToTensor())  # noqa: F841  held, like the script's `te`
    loader = DataLoader(dataset=train, batch_size=cfg.train.batch_size, shuffle=True)
    vae = reference_vae(cfg.model.hidden_dims, cfg.model.z_dim).to(dev)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.optim.lr)
    model = torch.compile(vae) if cfg.train.compile else vae
    amp = Precision(dev, cfg.train.precision)
    vae.train()
    train_loss = 0.0
    while True:
        for data, _ in loader:
            data = data.to(dev)
            opt.zero_grad()
            with amp.autocast():
                recon_batch, mu, log_var = model(data)
            loss = elbo_loss(recon_batch, data, mu, log_var)
            amp.backward(loss)
            train_loss += loss.item()  # the script's order: backward, .item(), step
            amp.step(opt)
            yield data.shape[0]


def minimal_loop(ctx: Context) -> Iterator[int]:
    """(b) minimal_loop.py: the split as one float tensor on the device, batches by indexing a permutation."""
    import torch

    cfg, dev = ctx.cfg, ctx.device
    logits = ctx.args.minimal_loss == "logits"
    torch.manual_seed(cfg.train.seed)
    train, test = ctx.splits()
    X = train.images.to(dev).float().div_(255)
    Xt = test.images.to(dev).float().div_(255)  # noqa: F841  held, as minimal_loop.py holds it
    vae = reference_vae(cfg.model.hidden_dims, cfg.model.z_dim).to(dev)
    fused = {"fused": True} if ctx.args.minimal_adam == "fused" else {}
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.optim.lr, **fused)
    model = torch.compile(vae) if cfg.train.compile else vae
    amp = Precision(dev, cfg.train.precision)
    bs, n = cfg.train.batch_size, X.shape[0]
    tot = 0.0
    while True:
        perm = torch.randperm(n, device=dev)
        for i in range(0, n, bs):
            x = X[perm[i : i + bs]]
            opt.zero_grad(set_to_none=True)
            with amp.autocast():
                out, mu, log_var = model(x, logits)
            loss = elbo_loss(out, x, mu, log_var, logits)
            amp.backward(loss)
            amp.step(opt)
            tot += loss.item()
            yield x.shape[0]


def floor_loop(ctx: Context) -> Iterator[int]:
    """(c) the floor of one step, graph_floor.py's: the reference model with the logits loss as a
    per-example mean, fused Adam, each batch a slice of the epoch's permuted float copy on the
    device, the loss summed on the device (no per-step sync). On CUDA the whole step (forward,
    backward, fused Adam with capturable=True) is captured once as a CUDA graph after 3 warm-up
    steps on a side stream, and each step copies its batch into the static input and replays; fp16
    stays eager there (GradScaler.step syncs). Never compiled: it is the floor --compile is measured against."""
    import torch
    import torch.nn.functional as F

    from vae_dist.data import to_unit

    cfg, dev = ctx.cfg, ctx.device
    torch.manual_seed(cfg.train.seed)
    train, _ = ctx.splits()
    X = to_unit(train.images.to(dev))
    vae = reference_vae(cfg.model.hidden_dims, cfg.model.z_dim).to(dev)
    graphed = dev.type == "cuda" and cfg.train.precision != "fp16"
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.optim.lr, fused=True, capturable=graphed)
    amp = Precision(dev, cfg.train.precision)
    B, n = cfg.train.batch_size, X.shape[0]
    total = torch.zeros((), device=dev)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            logits, mu, log_var = vae(x, logits=True)
        rec = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").sum(1)
        mu, log_var = mu.float(), log_var.float()
        loss = (rec - 0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)).mean()
        amp.backward(loss)
        amp.step(opt)
        total.add_(loss.detach())

    run = step
    if graphed:
        static_x = X[:B].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as PyTorch's CUDA Graphs notes ask
            for _ in range(3):
                step(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step(static_x)

        def run(x: torch.Tensor) -> None:
            static_x.copy_(x)
            graph.replay()

    while True:
        Xp = X[torch.randperm(n, device=dev)]  # the epoch's order, materialised once
        for i in range(n // B):
            run(Xp[i * B : (i + 1) * B])
            yield B


def toolkit_loop(ctx: Context) -> Iterator[int]:
    """(d) the real trainer, driven as fit() drives it: `Trainer.optimizer_steps` (train_step on each
    step's indices: one vae_dist.step.TrainStep, replayed as a CUDA graph where train.cuda_graphs
    allows; then after_optimizer_step: counters, health check and log_train every log_every_steps),
    stop_requested and reached_max_steps, nothing copied. The epoch-end work of fit() (evaluate,
    figures, checkpoints) is not timed, as in the other variants."""
    from accelerate.state import AcceleratorState, GradientState

    from vae_dist.trainer import Trainer

    # Accelerate keeps process-wide singletons; a Trainer built earlier in this process must not leak in.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = ctx.cfg
    if ctx.real:
        trainer = Trainer(cfg)  # loads data.root itself, as `vae-train` does
    else:
        train, test = ctx.splits()
        trainer = Trainer(cfg, train=train, test=test)
    ctx.trainer = trainer  # for the report: graphed or eager; metrics.jsonl goes to its temporary run.dir
    while True:
        for _ in trainer.optimizer_steps():  # fit()'s inner loop: the step, then after_optimizer_step
            if trainer.run.should_stop(trainer.step) or trainer.reached_max_steps():
                raise RuntimeError("the toolkit asked to stop: the bench sets no signal handler and no max_steps")
            yield cfg.train.batch_size  # one global batch per optimizer step
        trainer.close_epoch()


LOOPS: dict[str, Callable[[Context], Iterator[int]]] = {
    "original": original_loop,
    "minimal": minimal_loop,
    "floor": floor_loop,
    "toolkit": toolkit_loop,
}
