"""One typed config tree: YAML file in configs/, overridden on the command line as section.key=value.

Every field carries its unit or its choices in the trailing comment. `load_config` checks types,
choices and ranges of every key (numbers must be finite: no inf or nan) and raises one `ConfigError`
that lists all problems, each a sentence naming the key, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class _YAML12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `mode: off` stays the string "off"."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# ... and 1.2 floats: 2e-3 is a number (YAML 1.1 wants 2.0e-3).
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_YAML12Loader)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


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


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Returns (ok, value) with ints widened to float where a float is expected; nothing else is converted."""
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in get_args(tp), None
        for arg in get_args(tp):
            if arg is not type(None):
                ok, v = _coerce(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, str(value)  # paths like run.dir=2024 stay strings
    return isinstance(value, tp), value


def _non_finite(value: Any, tp: Any) -> bool:
    """True when a number for a float-typed key (or inside a list of them) is infinite or NaN, in any spelling:
    YAML's .inf/.nan, 1e400 (which YAML reads as inf), the strings inf/nan (YAML leaves them strings but
    Python's float() accepts them), or an integer too large for a float."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return value is not None and any(_non_finite(value, a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return isinstance(value, list) and any(_non_finite(v, get_args(tp)[0]) for v in value)
    if tp is not float or isinstance(value, bool):
        return False
    try:
        return not math.isfinite(float(value)) if isinstance(value, (int, float, str)) else False
    except OverflowError:  # float(10**400)
        return True
    except ValueError:  # a string that is no number at all: _coerce reports it as the wrong type
        return False


def _finite_name(tp: Any) -> str:
    """'a finite number', 'a list of finite numbers', '... or null': what a float-typed key accepts."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_finite_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    return "a list of finite numbers" if get_origin(tp) is list else "a finite number"


def _shown(value: Any) -> str:
    """A value as the user would type it (inf, not 'inf'), cut short when it is a 400-digit integer."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _yaml_kind(value: Any) -> str:
    """What a YAML value is, in YAML's words: 'a list', 'a string', 'a number', ..."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def _default(cls: type, key: str) -> Any:
    """The field's default value, for an example in an error message."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build_section(name: str, values: dict[str, Any], errors: list[str]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            errors.append(f"{name}.{key} is not a config key; {name} has: {', '.join(hints)}.")
            continue
        if _non_finite(value, hints[key]):
            default = _default(cls, key)
            example = f", e.g. {name}.{key}={default}" if default is not None else ""
            errors.append(
                f"{name}.{key}={_shown(value)}: must be {_finite_name(hints[key])} (inf and nan are refused, "
                f"and YAML reads a number beyond ±1.8e308 as inf); give an ordinary value{example}."
            )
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            errors.append(f"{name}.{key}={value!r}: must be {_type_name(hints[key])}.")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.epochs=3' -> ('train', 'epochs', 3); the value is read as YAML, so 3 is an int and [1, 2] a list."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not of the form section.key=value, e.g. train.epochs=3.")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError):  # ValueError: an integer over Python's 4300-digit limit
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply section.key=value overrides, check everything, return the Config."""
    tree: dict[str, dict[str, Any]] = {}
    errors: list[str] = []  # a bad section or override is reported with every other problem, not alone
    if path is not None:
        path = Path(path)
        if path.is_dir():
            names = sorted(p.name for p in path.glob("*.yaml"))
            holds = f" (it holds {', '.join(names)})" if names else ""
            raise ConfigError(
                f"--config {path} is a folder{holds}; pass one YAML file, e.g. --config {path / (names[0] if names else 'mnist.yaml')}."
            )
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass one of the files in configs/, e.g. --config configs/mnist.yaml."
            )
        try:
            text = path.read_text()
            loaded = read_yaml(text) if text.strip() else None  # YAML refuses a tab even in a blank file
        except (yaml.YAMLError, ValueError) as err:  # ValueError: not UTF-8, or an integer over 4300 digits
            mark = getattr(err, "problem_mark", None)  # yaml's own text spans lines; keep its problem and place
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or (str(err).splitlines() or [""])[0]
            raise ConfigError(
                f"config file {path} is not readable YAML ({what}{where}); fix it, "
                "or start again from a copy of configs/mnist.yaml."
            ) from err
        if loaded is None:  # 0 bytes, only blanks or only comments: a run on silent defaults is a mistake
            raise ConfigError(
                f"config file {path} is empty (no sections, only blanks or comments); copy configs/mnist.yaml "
                "and edit it, or drop --config to run with the defaults."
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} holds {_yaml_kind(loaded)} at the top level, but it must be a mapping of "
                "sections (data:, model:, optim:, ...) each holding key: value lines; see configs/mnist.yaml."
            )
        for section, values in loaded.items():
            if values is not None and not isinstance(values, dict):
                errors.append(
                    f"{path}: section {section!r} holds {_yaml_kind(values)}, but it must be a mapping of "
                    "key: value lines indented under it, as in configs/mnist.yaml."
                )
                continue
            tree[section] = dict(values or {})
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as err:
            errors.append(str(err))
            continue
        tree.setdefault(section, {})[key] = value
    try:
        cfg = config_from_dict(tree)
    except ConfigError as err:
        errors.append(str(err))
    if errors:
        raise ConfigError(" ".join(errors))
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and check a Config from {section: {key: value}} (a YAML file, or a saved run's config)."""
    errors: list[str] = []
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            errors.append(f"{section} is not a config section; the sections are: {', '.join(SECTIONS)}.")
            continue
        sections[section] = _build_section(section, values, errors)
    if errors:
        raise ConfigError(" ".join(errors))
    cfg = Config(**sections)
    for section in SECTIONS:
        errors.extend(getattr(cfg, section).problems())
    if errors:
        raise ConfigError(" ".join(errors))
    return cfg
