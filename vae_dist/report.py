"""What a run reports: the train and test records (metrics.jsonl, the tracker, the console), the
figures, and the summary at the end. The numbers come from the logging window (vae_dist.window) and
the evaluation; this module only writes and shows them.

Rank discipline: every method runs on every rank; only the main process writes files, prints (other
ranks' Console is disabled) and talks to the tracker.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vae_dist.console import Console
from vae_dist.errors import BadInput
from vae_dist.figures import FigureDrawer
from vae_dist.metrics_file import MetricsFile
from vae_dist.signals import signal_name
from vae_dist.tracking import Tracker, start_tracker


class MetricsFileError(BadInput, ValueError):
    """metrics.jsonl of a run being resumed is damaged (not a torn last line); the message names the line."""


class Report:
    """The records file, the tracker, the console, the figures and the summary of one run."""

    def __init__(self, cfg, accelerator, run_dir: Path, test_images, test_labels, steps_per_epoch: int):
        self.cfg, self.acc = cfg, accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir = run_dir
        self.file = MetricsFile(run_dir / "metrics.jsonl")
        self.console = Console(enabled=self.is_main)
        self.tracker = Tracker()
        self.tracker_run_id: str | None = None
        self.test_images, self.test_labels, self.steps_per_epoch = test_images, test_labels, steps_per_epoch
        self.figures: FigureDrawer | None = None  # main process: from `start` to `close_figures`
        self.best_test_elbo = math.inf

    # ---------------------------------------------------------------- checkpoint contents
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_test_elbo": None if math.isinf(self.best_test_elbo) else self.best_test_elbo,
            "tracker_run_id": self.tracker_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_test_elbo = math.inf if state["best_test_elbo"] is None else state["best_test_elbo"]
        self.tracker_run_id = state["tracker_run_id"]

    def sync(self) -> None:
        """The records written so far on disk (main process), so that a checkpoint never covers records
        a crash of the machine could take back."""
        if self.is_main:
            self.file.sync()

    def keep_records_through(
        self,
        step: int,
        epochs: int = 0,
        resume_from: Callable[[int], Path | None] | None = None,
        log_every: int | None = None,
    ) -> None:
        """metrics.jsonl as a run continuing after `step` needs it (main process): the records a
        resumed run will log again are dropped, and so is a torn last line (a process killed while
        writing it), with one warning; a last record without its newline gets one. Raises
        MetricsFileError, before anything is changed, for any other damage, and when records the
        checkpoint covers (steps up to `step`, `epochs` test records) are missing: a resume would
        leave them out for good. `log_every`: the logging interval that wrote
        the records (the checkpoint's). `resume_from(s)`: the newest checkpoint at or before step s, to offer;
        None for a checkpoint from another run.dir, whose records this file never held (no check)."""
        if not self.is_main:
            return
        path = self.file.path  # a file: vae_dist.run.check_run_files refused anything else
        try:
            records, torn = self.file.read_checked()
        except OSError as err:
            raise MetricsFileError(
                f"{path} cannot be read ({err.strerror or err}); fix its permissions to resume, or choose a new run.dir."
            ) from None
        except ValueError as err:
            raise MetricsFileError(
                f"{err} Repair or delete that line to resume this run, or choose a new run.dir."
            ) from None
        if resume_from is not None:
            self.check_covered(records, step, epochs, resume_from, log_every or self.cfg.tracking.log_every_steps)
        if torn is not None:
            warnings.warn(
                f"{path}: dropped its last line, torn by a process that stopped while writing it "
                f"({torn[:60]!r}); the steps it covered are logged again.",
                stacklevel=2,
            )
        if torn is not None or not self.file.terminated() or any(self.file.replayed(r, step, epochs) for r in records):
            self.file.truncate_after(step, epochs)

    def check_covered(
        self, records: list[dict], step: int, epochs: int, resume_from: Callable[[int], Path | None], every: int
    ) -> None:
        """Raise MetricsFileError when the records stop before the checkpoint at `step` (the file lost
        its tail: a damaged disk, a copy from elsewhere): the train record of the last logging window
        the checkpoint closed, and the test record of each of its `epochs` completed epochs, must be there."""
        if step == 0:
            return  # a fresh start: what the file holds is dropped with the steps it covered
        train = [r["step"] for r in records if r.get("split") == "train" and r.get("step", 0) <= step]
        tested = {r.get("epoch") for r in records if r.get("split") == "test" and r.get("step", 0) <= step}
        due = step - step % every
        missing_train = due > 0 and (not train or max(train) < due)
        missing_test = [e for e in range(1, epochs + 1) if e not in tested]
        if not missing_train and not missing_test:
            return
        last = max([0, *(r.get("step", 0) for r in records)])
        what = f"its train records stop at step {max(train, default=0)}" if missing_train else ""
        if missing_test:
            what += (" and " if what else "") + f"the test record of epoch {missing_test[0]} is missing"
        earlier = resume_from(last if not missing_test else min(last, missing_test[0] * self.steps_per_epoch - 1))
        offer = (
            f"resume from {earlier} with train.resume={earlier} (the steps after it are trained and logged again)"
            if earlier
            else "move the checkpoints aside to train anew"
        )
        raise MetricsFileError(
            f"{self.file.path} lacks records that the checkpoint of step {step} covers ({what}): the file lost "
            f"part of its end, and a resume would leave those steps out of the run's records. Restore the file "
            f"from a copy, or {offer}, or choose a new run.dir."
        )

    def start(
        self, run_info: dict[str, Any], epoch: int, step_in_epoch: int, oversubscribed: str | None = None
    ) -> None:
        """The tracker (a resumed run continues its W&B run), the figure worker and the progress bars;
        one line saying what the run trains on, and one warning line when the CPU's cores are
        oversubscribed (the warning, from each machine's first process: vae_dist.processes)."""
        self.console.print(
            f"training on {run_info['device']} ({run_info['processor']}), {run_info['num_processes']} process(es), "
            f"precision {run_info['precision']}"
        )
        if oversubscribed and self.is_main:  # on stdout with the run's other lines: stderr says what stopped a run
            self.console.print(f"warning: {oversubscribed}")
        elif oversubscribed:  # the first process of another machine: its console is off
            print(f"warning: {oversubscribed}", flush=True)
        self.tracker = start_tracker(self.cfg, self.acc, self.run_dir, self.tracker_run_id, run_info)
        self.tracker_run_id = self.tracker.run_id or self.tracker_run_id
        if self.is_main:
            self.figures = self.figure_drawer()
        self.console.start(self.cfg.train.epochs, self.steps_per_epoch, epoch, step_in_epoch)

    def figure_drawer(self) -> FigureDrawer:
        """In place on a CPU run; on a GPU a worker process (started now, so that its imports overlap
        the first epochs) draws while training goes on."""
        return FigureDrawer(
            self.test_images,
            self.test_labels,
            self.run_dir,
            seed=self.cfg.train.seed,
            steps_per_epoch=self.steps_per_epoch,
            background=self.acc.device.type == "cuda",
        )

    def close_figures(self, step: int) -> None:
        """Wait for the draws in flight (no half-written PNG), send them at `step`, stop the worker."""
        self.log_figures(step, finish=True)

    def close_tracker(self) -> None:
        self.tracker.finish()

    # ---------------------------------------------------------------- train records
    def log_train(self, record: dict[str, Any], steps: int) -> None:
        """The train record of a logging window of `steps` steps (vae_dist.window)."""
        if self.is_main:
            self.file.write(record)
            self.tracker.log({f"train/{k}": v for k, v in record.items() if k != "split"}, step=record["step"])
        self.console.advance_steps(
            steps, f"step {record['step']}  elbo {record['elbo']:.2f}  {record['examples_per_s']:.0f} ex/s"
        )

    # ---------------------------------------------------------------- test records and figures
    def log_test(self, test: dict[str, float], step: int, epoch: int, step_in_epoch: int) -> None:
        """The test record after `epoch` completed epochs and `step_in_epoch` steps of the next (a run
        that stops inside an epoch, at train.max_steps, evaluates there)."""
        self.best_test_elbo = min(self.best_test_elbo, test["elbo"])
        record = {"split": "test", "epoch": epoch, "step": step, **test}
        if self.is_main:
            self.file.write(record)
            self.tracker.log({f"test/{k}": v for k, v in record.items() if k != "split"}, step=step)
        where = (
            f"step {step} ({step_in_epoch} of epoch {epoch + 1}'s {self.steps_per_epoch} steps)"
            if step_in_epoch
            else f"epoch {epoch}"
        )
        self.console.end_epoch(
            f"{where}  test elbo {test['elbo']:.2f}  (recon {test['recon']:.2f}, kl {test['kl']:.2f})"
        )

    def draw_figures(self, model: torch.nn.Module, step: int) -> None:
        """PNGs in run.dir (reconstructions, prior samples, latent space, loss curves), sent to the
        tracker: drawn in place on a CPU run, by a worker process while training goes on on a GPU."""
        if not self.is_main:
            return
        if self.figures is None:
            self.figures = self.figure_drawer()
        self.figures.submit(model, self.file.read(), step)
        self.log_figures(step)

    def log_figures(self, step: int, finish: bool = False) -> None:
        """Send the figures drawn so far to the tracker (W&B steps only go forward: at the current
        step, captioned with the step they show); `finish` waits for the last ones and stops the worker."""
        if self.figures is None:
            return
        done = self.figures.close() if finish else self.figures.collect()
        for paths, drawn_at in done:
            images = {k: v for k, v in paths.items() if k != "loss"}
            self.tracker.log_images(images, step=step, drawn_at=drawn_at)
        if finish:
            self.figures = None

    # ---------------------------------------------------------------- what the run says
    def signal_received(self, signum: int, last_step_ran: bool) -> None:
        """The first stop signal of the run (recorded by StopSignals): say what happens next."""
        name = signal_name(signum)
        if not last_step_ran:
            self.console.print(f"received {name}: checkpointing after this step, then exiting")
        else:
            self.console.print(
                f"received {name}: the last step has run; finishing the final evaluation, checkpoint and export"
            )

    def nothing_to_train(self, step: int) -> dict[str, Any]:
        """A rerun of a finished run: nothing to train, one line saying so."""
        self.console.print(
            f"{self.run_dir} holds a finished run ({step} optimizer steps); its model is "
            f"{self.run_dir / 'model.safetensors'}. Nothing to train: raise train.epochs to train on, or choose a new run.dir."
        )
        return {"finished_already": True, "steps": step}

    # ---------------------------------------------------------------- the end
    def summary(
        self, test: dict[str, float], *, step: int, start_step: int, times: dict, info: dict, describe: str
    ) -> dict:
        """The run's numbers and where its wall time went. `times`: started (the process's clock at its
        start), loop (seconds), loop_end (clock), startup (phases); `info`: the device and processor."""
        elapsed, loop_end = times["loop"], times["loop_end"]
        return {
            "final_test_elbo": test.get("elbo", math.nan),
            "best_test_elbo": self.best_test_elbo,
            "steps": step,
            "steps_here": step - start_step,  # this process's share: 0 for a rerun that had nothing to train
            "seconds": elapsed,  # the training loop, epoch-end evaluation, pictures and checkpoints included
            "examples_per_s": (step - start_step) * self.cfg.train.batch_size / max(elapsed, 1e-9),
            "startup_seconds": loop_end - elapsed - times["started"],
            "startup": dict(times["startup"]),
            "final_seconds": time.perf_counter() - loop_end,  # final evaluation, checkpoint, export
            "step": describe,
            "device": f"{info['device']} ({info['processor']})",
        }

    def print_summary(self, s: dict) -> None:
        """The summary as a table (main process)."""
        phases = ", ".join(f"{k} {v:.1f}" for k, v in s["startup"].items())
        self.console.table(
            "vae_dist run",
            [
                ("final test elbo", f"{s['final_test_elbo']:.2f} nats"),
                ("best test elbo", f"{s['best_test_elbo']:.2f} nats"),
                ("optimizer steps", f"{s['steps']} ({s['step']})"),
                ("device", s["device"]),
                ("start-up", f"{s['startup_seconds']:.1f} s ({phases})"),
                ("training loop", f"{s['seconds']:.1f} s, evaluation, pictures and checkpoints included"),
                ("after the loop", f"{s['final_seconds']:.1f} s (final evaluation, checkpoint, export)"),
                (
                    "throughput",
                    f"{s['examples_per_s']:.0f} examples/s"
                    if s["steps_here"]
                    else "none: no optimizer step ran in this process",
                ),
                ("run directory", str(self.run_dir)),
            ],
        )
