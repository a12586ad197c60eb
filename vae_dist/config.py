"""One typed config tree: a YAML file (a shipped config, or any path), overridden on the command line as section.key=value.

Every field carries its unit or its choices in the trailing comment. `load_config` checks types,
choices and ranges of every key (numbers must be finite: no inf or nan) and raises one `ConfigError`
that lists all problems, each a sentence naming the key, before anything is written to disk. Reading
the file, the overrides and each value's type is vae_dist.config_load's job; the sections and their
checks are here.

The path of vae-train's arguments: vae_dist.cli.train → vae_dist.config_load.load_config (the file,
the overrides, each value's type) → the sections below (their checks) → back to the program.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from vae_dist.config_load import (  # noqa: F401  (re-exported: the toolkit imports them from vae_dist.config)
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    read_yaml,
    shipped_configs,
)


def _check(value: Any, *, ge: float | None = None, gt: float | None = None) -> str | None:
    """Range check for numbers; returns what is allowed when `value` is out of range."""
    if value is None:
        return None
    # NaN compares false with everything, so it would pass every bound below.
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if ge is not None and value < ge:
        return f"must be >= {ge}"
    if gt is not None and value <= gt:
        return f"must be > {gt}"
    return None


@dataclass
class DataConfig:
    root: str = "data"  # folder holding <Dataset>/raw/*-ubyte files (torchvision layout)
    dataset: Literal["mnist", "fashion_mnist", "kmnist"] = "mnist"
    binarize: Literal["none", "static", "dynamic"] = "none"  # none: grayscale targets in [0, 1]
    download: bool = True  # try torchvision's download when the files are missing

    def problems(self) -> list[str]:
        return []


@dataclass
class ModelConfig:
    z_dim: int = 2  # latent dimensions
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])  # encoder widths; decoder mirrors
    objective: Literal["elbo", "iwae"] = "elbo"  # training bound: ELBO, or IWAE (Burda et al. 2016)
    k: int = 1  # importance samples per example for objective=iwae (elbo uses 1)
    activation: Literal["relu", "tanh"] = "relu"  # hidden-layer nonlinearity (the IWAE paper's network: tanh)
    # Gradient estimator: reparam (plain reparameterisation) | stl (sticking the landing, Roeder et al.
    # 2017: q's parameters stopped in log q) | dreg (doubly reparameterised, Tucker et al. 2018; objective=iwae)
    estimator: Literal["reparam", "stl", "dreg"] = "reparam"
    init_output_bias: bool = False  # start the decoder's output bias at the logit of the training pixel means
    kl_warmup_steps: int = 0  # optimizer steps over which the KL weight rises linearly from 0 to 1; 0 = off

    def problems(self) -> list[str]:
        out = []
        if self.kl_warmup_steps < 0:
            out.append(f"model.kl_warmup_steps={self.kl_warmup_steps}: must be an integer >= 0 (0 = no warm-up).")
        if self.estimator == "dreg" and self.objective != "iwae":
            out.append(
                "model.estimator=dreg is an estimator of the IWAE bound's gradient; set model.objective=iwae, "
                "or use model.estimator=stl for the ELBO (with k = 1 DReG is STL)."
            )
        if self.z_dim < 1:
            out.append(f"model.z_dim={self.z_dim}: must be an integer >= 1 (the reference uses 2).")
        if not self.hidden_dims or any(h < 1 for h in self.hidden_dims):
            out.append(
                f"model.hidden_dims={self.hidden_dims}: must be a non-empty list of integers >= 1, e.g. [512, 256]."
            )
        if self.k < 1:
            out.append(f"model.k={self.k}: must be an integer >= 1.")
        if self.objective == "elbo" and self.k != 1:
            out.append(f"model.k={self.k}: only objective=iwae uses k; set model.objective=iwae or model.k=1.")
        return out

    def kl_weight_at(self, step: int) -> float:
        """The weight of the KL term (of log p(z) - log q(z) under iwae) in the optimizer step after
        `step` steps: step / kl_warmup_steps, 0 at the first step, 1 from step kl_warmup_steps on."""
        if self.kl_warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.kl_warmup_steps)


# The IWAE paper's schedule (Burda et al. 2016, section 5): stage i = 0..7 runs 3^i epochs at
# lr 1e-3 * 10^(-i/7), 3,280 epochs in all. optim.schedule=iwae_paper keeps each stage's share of
# the run (3^i / 3280 of its steps after warm-up) and the lr ratios, whatever train.epochs is.
PAPER_STAGES = 8
PAPER_EPOCHS = (3**PAPER_STAGES - 1) // 2  # 3280


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon in the denominator (the IWAE paper: 1e-4)
    weight_decay: float = 0.0  # Adam L2 penalty
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    # learning rate after warm-up; iwae_paper: lr * 10^(-i/7) for stage i = 0..7, stage i 3^i/3280 of the steps
    schedule: Literal["constant", "cosine", "step", "iwae_paper"] = "constant"
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to lr
    step_every: int = 10000  # schedule=step: multiply lr by step_gamma every this many optimizer steps
    step_gamma: float = 0.5  # schedule=step: decay factor
    min_lr_ratio: float = 0.0  # schedule=cosine: final lr as a fraction of lr

    def problems(self) -> list[str]:
        out = []
        for key, msg in (
            ("lr", _check(self.lr, gt=0)),
            ("eps", _check(self.eps, gt=0)),
            ("weight_decay", _check(self.weight_decay, ge=0)),
            ("grad_clip", _check(self.grad_clip, ge=0)),
            ("warmup_steps", _check(self.warmup_steps, ge=0)),
            ("step_every", _check(self.step_every, ge=1)),
            ("step_gamma", _check(self.step_gamma, gt=0)),
            ("min_lr_ratio", _check(self.min_lr_ratio, ge=0)),
        ):
            if msg:
                out.append(f"optim.{key}={getattr(self, key)}: {msg}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas={self.betas}: must be two numbers in [0, 1), e.g. [0.9, 0.999].")
        return out

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of the optimizer step after `step` steps of `total_steps`: linear warm-up
        from 0 to lr over warmup_steps, then the schedule."""
        if step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        elif self.schedule == "cosine":
            t = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
            factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        elif self.schedule == "step":
            factor = self.step_gamma ** ((step - self.warmup_steps) // self.step_every)
        elif self.schedule == "iwae_paper":
            factor = 10 ** (-paper_stage(step - self.warmup_steps, total_steps - self.warmup_steps) / 7)
        else:
            factor = 1.0
        return self.lr * factor


def paper_stage(step: int, steps: int) -> int:
    """The stage 0..7 of the IWAE paper's schedule that optimizer step `step` (0-based) of `steps` falls
    in. In the paper stage i ends after (3^(i+1) - 1) / 2 of the 3280 epochs; here after that share
    of `steps`: stage i + 1 starts at the first step >= steps * (3^(i+1) - 1) / 6560 (integer
    arithmetic, no rounding). With train.epochs=3280 the stages end after epochs 1, 4, 13, 40, 121,
    364, 1093 and 3280, as in the paper."""
    for i in range(PAPER_STAGES - 1):
        if step * 2 * PAPER_EPOCHS < steps * (3 ** (i + 1) - 1):  # step < steps * (3^(i+1) - 1) / 6560
            return i
    return PAPER_STAGES - 1


@dataclass
class TrainConfig:
    epochs: int = 40  # passes over the training split
    max_steps: int | None = None  # optional cap on optimizer steps; stops early when reached
    batch_size: int = 100  # global batch: examples per optimizer step, over all processes
    micro_batch_size: int | None = None  # examples per process per forward; default batch_size / processes
    eval_batch_size: int = 1000  # examples per evaluation chunk (memory only; never changes the result)
    seed: int = 0  # fixes init, data order, noise and binarization
    precision: Literal["no", "fp16", "bf16"] = "no"  # mixed precision; loss terms stay fp32
    max_nonfinite: int = 3  # consecutive non-finite losses before the run stops with an error
    resume: str = "auto"  # auto: newest valid checkpoint in run.dir | none | path to a checkpoint dir
    compile: bool = False  # torch.compile the model
    # torch.compile mode; "reduce-overhead" replays the compiled forward and backward as CUDA graphs on CUDA
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    cpu_threads: int | None = None  # torch threads per process on CPU; None = usable cores / local processes
    flush_denormal: bool = True  # on CPU, treat subnormal floats as zero (x86: ~40% faster after ~700 steps)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    # Replay each optimizer step as one CUDA graph; auto: on for CUDA in fp32 (precision=no) or bf16, off otherwise
    cuda_graphs: Literal["auto", "on", "off"] = "auto"

    def problems(self) -> list[str]:
        out = []
        for key, msg in (
            ("epochs", _check(self.epochs, ge=1)),
            ("max_steps", _check(self.max_steps, ge=1)),
            ("batch_size", _check(self.batch_size, ge=1)),
            ("micro_batch_size", _check(self.micro_batch_size, ge=1)),
            ("eval_batch_size", _check(self.eval_batch_size, ge=1)),
            ("max_nonfinite", _check(self.max_nonfinite, ge=1)),
            ("cpu_threads", _check(self.cpu_threads, ge=1)),
        ):
            if msg:
                out.append(f"train.{key}={getattr(self, key)}: {msg}.")
        if self.cuda_graphs == "on":
            # fp16 steps stay eager: with fused Adam GradScaler needs no host read, but no fp16 capture
            # has run on a GPU yet (vae_dist.step); torch.compile brings graphs of its own
            # (compile_mode=reduce-overhead).
            blockers = {
                "train.precision=fp16": self.precision == "fp16",
                "train.compile=true": self.compile,
                "train.device=cpu": self.device == "cpu",
            }
            for what, blocks in blockers.items():
                if blocks:
                    out.append(
                        f"train.cuda_graphs=on cannot be combined with {what}; use train.cuda_graphs=auto "
                        "(graphs where they apply) or off."
                    )
        return out

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches each process accumulates per optimizer step: global / (micro x processes)."""
        B, P, m = self.batch_size, num_processes, self.micro_batch_size
        if m is None:
            if B % P:
                raise ConfigError(
                    f"train.batch_size={B} cannot be split evenly over {P} processes; use a multiple of {P} "
                    f"(e.g. {max(P, B // P * P)} or {(B // P + 1) * P}), or set train.micro_batch_size."
                )
            return 1
        if B % (m * P):
            divisors = [d for d in range(1, B // P + 1) if (B // P) % d == 0] if B % P == 0 else []
            raise ConfigError(
                f"train.batch_size={B} is not divisible by train.micro_batch_size={m} x {P} processes = {m * P}; "
                f"use a batch_size that is a multiple of {m * P} (e.g. {max(m * P, B // (m * P) * m * P)})"
                + (f", or a micro_batch_size from {divisors}." if divisors else ".")
            )
        return B // (m * P)

    def micro_batch(self, num_processes: int) -> int:
        """Examples per process per forward pass."""
        return self.batch_size // (num_processes * self.accumulation_steps(num_processes))

    def batch_split(self, num_processes: int) -> tuple[int, int]:
        """(accumulation steps, micro-batch): how the global batch splits over `num_processes`."""
        return self.accumulation_steps(num_processes), self.micro_batch(num_processes)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every this many optimizer steps; 0 = off
    every_epochs: int = 1  # save at the end of every this many epochs; 0 = off (the end is always saved)
    keep: int = 2  # newest checkpoints kept under run.dir/checkpoints

    def problems(self) -> list[str]:
        out = []
        for key, msg in (
            ("every_steps", _check(self.every_steps, ge=0)),
            ("every_epochs", _check(self.every_epochs, ge=0)),
            ("keep", _check(self.keep, ge=1)),
        ):
            if msg:
                out.append(f"checkpoint.{key}={getattr(self, key)}: {msg}.")
        return out


@dataclass
class TrackingConfig:
    mode: Literal["auto", "online", "offline", "off"] = "auto"  # auto: online with W&B credentials, else offline
    project: str = "vae_dist"  # W&B project
    entity: str | None = None  # W&B team or user; None = your default entity
    name: str | None = None  # W&B run name; None = the run directory's name
    group: str | None = None  # W&B group
    tags: list[str] = field(default_factory=list)  # W&B tags
    log_every_steps: int = 50  # optimizer steps between train scalars (and the only host sync for them)
    images_every_epochs: int = 1  # epochs between image panels and PNG figures; 0 = only at the end
    log_model: bool = True  # upload the exported model as a W&B artifact at the end

    def problems(self) -> list[str]:
        out = []
        for key, msg in (
            ("log_every_steps", _check(self.log_every_steps, ge=1)),
            ("images_every_epochs", _check(self.images_every_epochs, ge=0)),
        ):
            if msg:
                out.append(f"tracking.{key}={getattr(self, key)}: {msg}.")
        return out


@dataclass
class DistConfig:
    # Seconds a process waits for another that stopped answering (a dead node, a network partition)
    # before the run exits 76; also the longest any collective may wait, so keep it above the longest
    # stall of one rank that the others wait for (rank 0 writing a checkpoint, figures, W&B start-up).
    timeout_s: float = 300.0

    def problems(self) -> list[str]:
        msg = _check(self.timeout_s, ge=4)
        return [f"dist.timeout_s={self.timeout_s}: {msg}."] if msg else []


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything a run writes goes under this folder

    def problems(self) -> list[str]:
        return [] if self.dir else ["run.dir is empty: give the folder the run writes to, e.g. run.dir=runs/mnist."]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def build_config(sections: dict[str, dict[str, Any]]) -> Config:
    """The Config from each section's values (already of their fields' types, vae_dist.config_load),
    after every section's checks; a ConfigError lists every problem."""
    cfg = Config(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    errors = [problem for name in SECTIONS for problem in getattr(cfg, name).problems()]
    if errors:
        raise ConfigError(" ".join(errors))
    return cfg
