"""What a checkpoint holds, declared once, and when it is saved and resumed.

Each component of the run (the trainer's counters, the step's grad scaler, the logging window, the
report's records, the RNG) is `Stateful`: its `state_dict()` is saved under its own name, and at a
resume it gets back only its own part, so two components can never clash on a key (torchtitan's
namespaced states, litgpt's `state = {...}`). Its JSON-able values go to state.json under
"components", its tensors (this rank's) to trainer.safetensors as `name.key`, gathered over the
ranks. A checkpoint written before the components were named (format 2 and older: one flat dict)
resumes too: `component_parts` hands each component the keys it wrote then (`LEGACY_KEYS`).

The files, and how they are written and verified: vae_dist.checkpoint_files.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from vae_dist.checkpoint_files import (  # noqa: F401  (re-exported: the rest of the toolkit reads checkpoints here)
    FORMAT,
    PREFIX,
    CheckpointError,
    CheckpointWriteError,
    check_model_shapes,
    checkpoints_dir,
    clear_stale_temps,
    latest_valid,
    load_checkpoint,
    refuse_all_damaged,
    resolve_resume,
    verify,
)
from vae_dist.checkpoint_writer import CheckpointWriter  # noqa: F401  (re-exported)
from vae_dist.config import ConfigError


# ------------------------------------------------------------------ the manager
class Stateful(Protocol):
    """What a checkpoint holds of a component: `state_dict()` gives JSON-able values (state.json) and
    tensors (this rank's, gathered over the ranks into trainer.safetensors); `load_state_dict` gets
    the same keys back, with this rank's tensors (absent on another process count)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The global torch RNG states of this rank. No training draw uses them (all noise is seeded by
    step, vae_dist.step), so they are restored on the same process count only, for completeness."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def state_dict(self) -> dict[str, Any]:
        return {"rng_cpu": torch.get_rng_state(), **({"rng_cuda": torch.cuda.get_rng_state()} if self.cuda else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"].clone())
        if self.cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].clone())


class CheckpointManager:
    """When to save; save, resume and keep-k; the background writer and its failures.

    What a checkpoint holds is declared once, in `states`: each component's own state_dict (the
    training counters, the step's scaler and skip count, the logging window, the RNG), next to the
    model's weights and the optimizer (through the step). Every method runs on every rank; the main
    process writes. `agree(flag)` is True on every rank when it is on any (vae_dist.run.Run.any_rank);
    `check(step)` is the health check a checkpoint must pass (it never holds diverged weights)."""

    def __init__(
        self,
        cfg,
        accelerator,
        model,
        step_fn,
        states: dict[str, Stateful],
        writer: CheckpointWriter,
        agree: Callable,
        check: Callable,
    ):
        self.cfg, self.acc, self.model, self.step_fn = cfg, accelerator, model, step_fn
        self.states, self.agree, self.check = states, agree, check
        self.run_dir = Path(cfg.run.dir)
        self.writer = writer
        self.saved_step = 0  # the step of the newest checkpoint (0: none, nothing trained yet either)
        if accelerator.is_main_process:  # saves killed outright left these; they are never loaded
            clear_stale_temps(self.run_dir)

    # ---------------------------------------------------------------- when
    def due(self, step: int, epochs_done: int | None = None) -> bool:
        """Whether a checkpoint is due after optimizer step `step` (checkpoint.every_steps) or, given
        `epochs_done` at an epoch's end, after that many (checkpoint.every_epochs; the last epoch is
        saved by the end of training itself)."""
        c = self.cfg.checkpoint
        if epochs_done is None:
            return bool(c.every_steps) and step % c.every_steps == 0
        return bool(c.every_epochs) and epochs_done % c.every_epochs == 0 and epochs_done < self.cfg.train.epochs

    # ---------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """All ranks: agree on health, gather the per-rank tensors; the main process snapshots the
        state and writes it atomically in the background (CheckpointWriter), while training goes on."""
        acc = self.acc
        self.check_writer(wait=True)  # the previous save is on disk (or its failure stops every rank)
        self.check(step)
        parts = {name: component.state_dict() for name, component in self.states.items()}
        state: dict[str, Any] = {
            "step": step,
            "components": {name: {k: v for k, v in p.items() if not torch.is_tensor(v)} for name, p in parts.items()},
        }
        per_rank = {f"{name}.{k}": v for name, p in parts.items() for k, v in p.items() if torch.is_tensor(v)}
        per_rank = {k: acc.gather(v.to(acc.device)).reshape(acc.num_processes, -1).cpu() for k, v in per_rank.items()}
        path = checkpoints_dir(self.run_dir) / f"{PREFIX}{step:08d}"
        if acc.is_main_process:
            import accelerate

            import vae_dist

            model = acc.unwrap_model(self.model)
            state.update(
                format=FORMAT,
                num_processes=acc.num_processes,
                config=self.cfg.to_dict(),
                versions={
                    "vae_dist": vae_dist.__version__,
                    "torch": torch.__version__,
                    "accelerate": accelerate.__version__,
                    "python": sys.version.split()[0],
                },
            )
            path = self.writer.submit(
                self.run_dir,
                step,
                model_state=model.state_dict(),
                model_config=model.config_dict,
                optimizer_state=self.step_fn.optimizer_state(),
                trainer_tensors=per_rank,
                state=state,
                keep=self.cfg.checkpoint.keep,
            )
        self.saved_step = step
        return path

    def save_at_stop(self, step: int) -> tuple[Path | None, str]:
        """After a stop signal: save when a step ran since the last checkpoint, and wait until it is on
        disk. Returns the checkpoint and what happened, in words."""
        if step > self.saved_step:
            path = self.save(step)
            what = f"checkpoint saved to {path}"
        elif step > 0:
            path = checkpoints_dir(self.run_dir) / f"{PREFIX}{step:08d}"
            what = f"no step ran since the checkpoint {path}"
        else:
            path, what = None, "no optimizer step had run, so there was nothing to save"
        self.check_writer(wait=True)
        return path, what

    def check_writer(self, wait: bool) -> None:
        """Raise on every rank when the main process's background save failed (`wait`: also for the
        save in flight), so that no rank goes on into a collective the main process never joins."""
        error = self.writer.failure(wait) if self.acc.is_main_process else None
        if self.agree(error is not None):
            raise error or CheckpointWriteError(
                "the main process could not write a checkpoint (its message names the file); this process stops too."
            )

    def export(self) -> Path:
        """model.safetensors + config.json in run.dir, loadable with VAE.from_pretrained(run.dir)."""
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(self.run_dir)
        acc.wait_for_everyone()
        return self.run_dir / "model.safetensors"

    # ---------------------------------------------------------------- resume
    def resume(self) -> Path | None:
        """Load train.resume (auto: the newest valid checkpoint in run.dir) into the model, the
        optimizer and every component, on every rank; None when the run starts fresh."""
        cfg, acc = self.cfg, self.acc
        if cfg.train.resume == "none" and any(checkpoints_dir(self.run_dir).glob(f"{PREFIX}*")):
            raise ConfigError(
                f"train.resume=none but {checkpoints_dir(self.run_dir)} already holds checkpoints that a fresh run "
                "would mix with its own; resume them with train.resume=auto, or choose a new run.dir."
            )
        with warnings.catch_warnings():
            if not acc.is_main_process:
                warnings.simplefilter("ignore")  # the main process reports skipped checkpoints once
            path = resolve_resume(cfg.train.resume, self.run_dir)
        if path is None and cfg.train.resume == "auto":
            refuse_all_damaged(self.run_dir)
        if path is None:
            return None
        ckpt = load_checkpoint(path)
        s = ckpt.state
        check_same_batch(s, cfg.train.batch_size, path)
        self.warn_if_older(s, path)
        model = acc.unwrap_model(self.model)
        check_model_shapes(model.state_dict(), ckpt.model, path / "model.safetensors")
        model.load_state_dict(ckpt.model)
        self.step_fn.load_optimizer(ckpt.optimizer)
        # This rank's row of each per-rank tensor, where the process count is the checkpoint's.
        this_rank = {k: v[acc.process_index] for k, v in ckpt.trainer.items() if v.shape[0] == acc.num_processes}
        parts = component_parts(s, this_rank)
        for name, component in self.states.items():
            component.load_state_dict(parts[name])
        self.saved_step = s["step"]
        return path

    def earlier_than(self, resumed: Path | None) -> Callable[[int], Path | None] | None:
        """For a resume from this run.dir's own checkpoints (which cover its records up to their step):
        `find(step)`, the newest valid checkpoint at or before `step`, to offer when records are
        missing. None for a fresh start or a checkpoint from elsewhere (a warm start with
        train.resume=PATH starts this run.dir's records at its step)."""
        if resumed is None or resumed.resolve().parent != checkpoints_dir(self.run_dir).resolve():
            return None
        return lambda step: latest_valid(self.run_dir, warn=False, at_most=step)

    @staticmethod
    def warn_if_older(state: dict[str, Any], path: Path) -> None:
        """Warn where a checkpoint of an older format cannot resume bit-exactly (a newer one is refused
        by load_checkpoint)."""
        found = state.get("format", 1)
        if found < 2 and state["step_in_epoch"] > 0:
            warnings.warn(
                f"{path} was written by vae_dist before the batch plan of vae_dist.step (checkpoint format "
                f"{found}): the rest of epoch {state['epoch'] + 1} follows the new data order, so "
                "this resume is not bit-exact with the run that wrote it (every later epoch is complete).",
                stacklevel=3,
            )


# The keys each component wrote into the one flat state of a checkpoint of format 2 or older; the
# logging window also needs the step its health check had reached (the checkpoint's own step).
LEGACY_KEYS = {
    "train": ("step", "epoch", "step_in_epoch"),
    "step": ("scaler", "fp16_skipped"),
    "window": ("window_start_step", "log_every_steps", "nonfinite_run", "rows"),
    "report": ("best_test_elbo", "tracker_run_id"),
    "rng": ("rng_cpu", "rng_cuda"),
}


def component_parts(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Each component's part of a loaded checkpoint: its JSON values and this rank's tensors."""
    if state.get("format", 1) >= 3:
        parts = {name: dict(part) for name, part in state["components"].items()}
        for key, value in tensors.items():
            name, _, own_key = key.partition(".")
            parts.setdefault(name, {})[own_key] = value
        return parts
    flat = {**state, **tensors}
    parts = {name: {k: flat[k] for k in keys if k in flat} for name, keys in LEGACY_KEYS.items()}
    parts["window"]["checked_step"] = state["step"]
    return parts


def check_same_batch(state: dict[str, Any], batch_size: int, path: Path) -> None:
    """A resume keeps the global batch: with another, the rest of the epoch would take other examples
    than the batch plan gave the steps already taken, and the step and epoch counts would no longer
    agree. The process count and micro-batch may change (the numbers do not)."""
    saved = state.get("config", {}).get("train", {}).get("batch_size")
    if saved is not None and saved != batch_size:
        raise ConfigError(
            f"{path} was trained with train.batch_size={saved} (the global batch), and this run asks for "
            f"train.batch_size={batch_size}; a resume keeps the global batch. Resume with train.batch_size={saved}, "
            "or train with the new batch size in a new run.dir."
        )
