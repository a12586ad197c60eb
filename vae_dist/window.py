"""The logging window: the steps since the last train record, and the health check of their loss.

The step writes each optimizer step's summed loss terms into a row of `rows` on the device (in a
CUDA graph through the device cursor `row`); nothing in a step waits for the device. Every
`tracking.log_every_steps` steps, `close` reduces those sums over the processes together with each
step's finiteness, the gradient norm and the fp16 skip count, and reads the lot with one
device-to-host copy: the only host sync of the interval. Before a checkpoint, `check` runs the
health check of the steps not yet checked, so a checkpoint never holds diverged weights.

Every method runs on every rank (the reductions are collectives), so all ranks reach the same
verdict and none waits in a collective for one that raised.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from vae_dist.checkpoint import resolve_resume
from vae_dist.errors import VaeDistError
from vae_dist.streams import TERMS


class NonFiniteLossError(VaeDistError, RuntimeError):
    """The loss was NaN/inf for train.max_nonfinite consecutive optimizer steps."""


class LogWindow:
    """The rows the step fills, the window's clock, and the run of non-finite steps (see the module docstring)."""

    def __init__(self, cfg, accelerator, run_dir: Path):
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        dev = accelerator.device
        self.rows = torch.zeros(cfg.tracking.log_every_steps, len(TERMS), device=dev)  # row i: the window's i-th step
        self.row = torch.zeros(1, dtype=torch.long, device=dev)  # the next row, for a graph's replay
        self.used = 0  # rows written since the last reset (the host's count)
        # (clock, step): the window holds steps start[1] + 1 .. now; its clock measures training only
        # (`pause_clock` moves it past evaluation and saving).
        self.start = (time.perf_counter(), 0)
        self.checked_step = 0  # steps up to this one passed the health check
        self.nonfinite_run = 0  # consecutive non-finite steps up to checked_step
        self.resumed_log_every: int | None = None  # the logging interval of the checkpoint resumed from

    def due(self, step: int) -> bool:
        return step % self.cfg.tracking.log_every_steps == 0

    def reset(self, used: int = 0) -> None:
        """Start a new window; `used` rows of it already hold sums (a resumed window)."""
        if used == 0:
            self.rows.zero_()
        self.row.fill_(used)
        self.used = used

    def pause_clock(self, since: float) -> None:
        """Train examples/s measures training: its clock stops from `since` (evaluation, pictures, saving) to now."""
        t_start, step_start = self.start
        self.start = (t_start + time.perf_counter() - since, step_start)

    def close(self, step: int, epoch: int, lr: float, kl_weight: float, step_fn) -> tuple[dict[str, Any], int]:
        """Check health and make the train record of the window ending at `step`, with one host read;
        the record and the number of steps it covers. `lr` and `kl_weight` are those of the window's
        last step; `kl_weight` is recorded only when model.kl_warmup_steps > 0."""
        t_start, step_start = self.start
        steps = step - step_start
        examples = steps * step_fn.plan.micro * step_fn.plan.accum  # this rank's
        rows = self.rows[:steps]
        first = self.checked_step - step_start
        finite = torch.isfinite(rows[first:, 2:]).flatten().to(rows.dtype)  # [recon ok, kl ok] of unchecked steps
        summed = self.acc.reduce(torch.cat([rows.sum(0), rows.new_tensor([examples]), finite]), reduction="sum")
        # Identical on every rank (all-reduced gradients and scaler): read, not reduced.
        same = torch.stack([step_fn.grad_norm().float(), step_fn.skipped.float()]).to(rows.dtype)
        n = len(TERMS)
        values = torch.cat([summed[:n] / summed[n], same, summed[n + 1 :]]).tolist()  # the interval's host read
        self.check_health(step, [v == self.acc.num_processes for v in values[n + 2 :]])
        record = {
            "split": "train",
            "epoch": epoch,
            "step": step,
            **dict(zip(TERMS, values[:n])),
            "lr": lr,
            **({"kl_weight": kl_weight} if self.cfg.model.kl_warmup_steps > 0 else {}),
            "grad_norm": values[n],
            "fp16_skipped_steps": int(values[n + 1]),
            "examples_per_s": steps * self.cfg.train.batch_size / max(time.perf_counter() - t_start, 1e-9),
        }
        self.reset()
        self.start = (time.perf_counter(), step)
        return record, steps

    def check(self, step: int) -> None:
        """The health check of the steps not yet checked, up to `step` (before a checkpoint)."""
        first, last = self.checked_step - self.start[1], step - self.start[1]
        if last == first:
            return
        ok = torch.isfinite(self.rows[first:last, 2:]).int()
        finite = (self.acc.reduce(ok, reduction="sum") == self.acc.num_processes).flatten().tolist()
        self.check_health(step, finite)

    def check_health(self, step: int, finite: list[bool]) -> None:
        """Raise when the loss was non-finite for train.max_nonfinite consecutive steps. `finite`: for
        each step after checked_step up to `step`, [recon ok, kl ok] flattened, agreed by every rank."""
        for i in range(len(finite) // 2):
            row = finite[2 * i : 2 * i + 2]
            self.nonfinite_run = 0 if all(row) else self.nonfinite_run + 1
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                term = " and ".join(t for t, ok in zip(("recon", "kl"), row) if not ok)
                last = resolve_resume("auto", self.run_dir) if self.run_dir.exists() else None
                raise NonFiniteLossError(
                    f"the training loss was not finite for {self.nonfinite_run} consecutive optimizer steps, up to "
                    f"step {self.checked_step + i + 1} (non-finite term: {term}). The last good weights are in "
                    f"{last or 'no checkpoint (none was saved yet)'}. Lower optim.lr, set optim.grad_clip, "
                    "or train in train.precision=no or bf16."
                )
        self.checked_step = step

    # ---------------------------------------------------------------- checkpoint contents
    def state_dict(self) -> dict[str, Any]:
        """Where the window started and its rows (this rank's: per-rank in the checkpoint)."""
        return {
            "window_start_step": self.start[1],
            "checked_step": self.checked_step,
            "log_every_steps": self.cfg.tracking.log_every_steps,
            "nonfinite_run": self.nonfinite_run,
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpoint's window. It restarts empty on another process count or logging
        interval (`rows` missing or of another size): only the train scalars of that one interval then
        cover fewer steps."""
        step, rows = state["checked_step"], state.get("rows")
        if rows is not None and rows.numel() == self.rows.numel():
            self.rows.copy_(rows.view_as(self.rows))
            self.reset(used=step - state["window_start_step"])
            self.start = (time.perf_counter(), state["window_start_step"])
        else:
            self.start = (time.perf_counter(), step)
        self.nonfinite_run, self.checked_step = state["nonfinite_run"], step
        self.resumed_log_every = state.get("log_every_steps")  # the interval that wrote the records so far
