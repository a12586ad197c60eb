"""The training loop: Accelerate around the VAE/ELBO core.

Distributed, precision and rank concerns are settled in `Trainer.__init__`; `fit` reads like the
algorithm: for each epoch, for each global batch, take an optimizer step; evaluate; checkpoint.
What one optimizer step computes (batch plan, noise, forward, backward, update, device-side sums,
and its capture as one CUDA graph) is `vae_dist.step`; the trainer drives it and owns epochs,
evaluation, logging, health checks, signals and checkpoints.

Rank discipline: every method runs on all ranks; only `self.is_main` writes files, prints (the
Console of other ranks is disabled) and talks to the tracker.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import accelerate
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState

import vae_dist
from vae_dist.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    check_model_shapes,
    checkpoints_dir,
    clear_stale_temps,
    load_checkpoint,
    resolve_resume,
)
from vae_dist.config import Config, ConfigError
from vae_dist.console import Console
from vae_dist.data import Split, load_data
from vae_dist.evaluate import evaluate_elbo
from vae_dist.figures import FigureDrawer
from vae_dist.model import VAE
from vae_dist.processes import LaunchError, check_launch, set_cpu_threads
from vae_dist.runlock import RunLock, RunLocked
from vae_dist.signals import StopSignals, signal_name
from vae_dist.step import BatchPlan, TrainStep, prepare, wants_graphs
from vae_dist.streams import TERMS
from vae_dist.tracking import MetricsFile, Tracker, log_with, start_tracker


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for train.max_nonfinite consecutive optimizer steps."""


def build_state(cfg: Config) -> PartialState:
    """The process group on the device train.device names. On a machine without CUDA (or with
    train.device=cpu), `cpu=True` gives a gloo group under `accelerate launch --multi_gpu`; a launcher
    that asked for N processes but reached one is refused."""
    cuda = torch.cuda.is_available()
    if cfg.train.device == "cuda" and not cuda:
        raise ConfigError(
            "train.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use train.device=auto or cpu."
        )
    cpu = cfg.train.device == "cpu" or not cuda
    graphs = wants_graphs(
        cfg.train.cuda_graphs, torch.device("cpu" if cpu else "cuda"), cfg.train.precision, cfg.train.compile
    )
    if graphs and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Capturing NCCL collectives needs the watchdog's async error handling off, set before the
        # process group exists (PyTorch's CUDA Graphs notes: "Usage with DistributedDataParallel").
        # Overwritten, not defaulted: torchrun sets it to 1 in every worker it starts.
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    state = PartialState(cpu=cpu)
    check_launch(state.num_processes)
    if state.device.type == "cpu":
        if cfg.train.cuda_graphs == "on":
            raise ConfigError(
                "train.cuda_graphs=on but this run trains on the CPU; use train.cuda_graphs=auto or off, "
                "or run where torch sees a GPU."
            )
        set_cpu_threads(cfg.train.cpu_threads, state.num_processes)
        # After ~700 steps, Adam's first moment of weights that almost never get a gradient (MNIST's
        # black border pixels, dead ReLU units) decays into float32's subnormal range, where every x86
        # operation on it is many times slower: a CPU run loses ~40% of its speed for no accuracy.
        # Worker threads copy this mode from the main thread when they start, so it is set before
        # the first parallel operation of `vae-train`.
        torch.set_flush_denormal(cfg.train.flush_denormal)
    return state


def lock_run_dir(run_dir: Path) -> RunLock:
    """Hold run.dir for this run (main process): refused while another live run holds it, and a
    ConfigError when the folder cannot be written, before anything is written into it."""
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError as err:
        raise ConfigError(
            f"run.dir={run_dir} cannot be written ({err.strerror or err}); choose a folder you can write to."
        ) from err
    return lock


class Trainer:
    def __init__(
        self,
        cfg: Config,
        train: Split | None = None,
        test: Split | None = None,
        signals: StopSignals | None = None,
        started: float | None = None,
    ):
        """Everything before the first step: process group, run.dir lock, data, model, resume.
        `signals`: the stop signals `vae-train` installed at its start (else `fit` installs its own);
        `started`: time.perf_counter() when the process began its work (for the start-up report)."""
        self.cfg = cfg
        self.signals = signals or StopSignals()
        clock = time.perf_counter()
        self.started = started or clock
        state = build_state(cfg)
        P = state.num_processes
        self.accum = cfg.train.accumulation_steps(P)  # raises ConfigError naming the numbers to change
        self.micro = cfg.train.micro_batch(P)
        self.accelerator = Accelerator(
            cpu=state.device.type == "cpu",
            mixed_precision=cfg.train.precision,
            gradient_accumulation_steps=self.accum,
            log_with=log_with(cfg.tracking),
            # No AutocastKwargs: with one, every `accelerator.autocast()` rebuilds its kwargs inside
            # accelerate's clear_environment(), which empties and restores os.environ (about 0.3 ms a
            # step on the 2-core CPU, and racy with other threads). Autocast's weight cache is harmless here: each
            # autocast region opens and closes inside the captured step (vae_dist.step).
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.console = Console(enabled=self.is_main)
        self.run_dir = Path(cfg.run.dir)
        new_dir = not self.run_dir.exists()
        # One run per run.dir: the main process holds the lock until the run ends (or dies); stale
        # temporary directories of a save that was killed are cleared once it is held.
        self.lock = self.on_main(lambda: lock_run_dir(self.run_dir))
        if self.is_main:
            clear_stale_temps(self.run_dir)
        self.writer = CheckpointWriter()
        # Seconds per start-up phase: imports before the Trainer, process group and devices, data, model.
        self.startup = {"imports": clock - self.started, "devices": time.perf_counter() - clock}
        try:
            self.setup(train, test)
        except BaseException:
            self.release()
            if self.is_main and new_dir and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
                shutil.rmtree(self.run_dir)  # a run refused at start-up leaves no empty run.dir behind
            raise

    def setup(self, train: Split | None, test: Split | None) -> None:
        """Data on the device, model, optimizer, the step, counters, then the resume."""
        cfg, acc = self.cfg, self.accelerator
        dev, P = acc.device, acc.num_processes
        clock = time.perf_counter()
        if train is None:
            with acc.main_process_first():  # a download happens once, not once per rank
                train, test = load_data(cfg.data)
        if len(train) < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is larger than the {len(train)} training examples; "
                "lower train.batch_size."
            )
        # The splits live on the device as uint8 (47 MB for MNIST); each epoch's batches are gathered
        # from them in one operation (vae_dist.step).
        self.train_images = train.images.to(dev)
        self.test_images = test.images.to(dev)
        self.test_labels = test.labels
        self.startup["data"] = time.perf_counter() - clock

        clock = time.perf_counter()
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and topology
        model = VAE(x_dim=train.images.shape[1], hidden_dims=cfg.model.hidden_dims, z_dim=cfg.model.z_dim).to(dev)
        graphs = wants_graphs(cfg.train.cuda_graphs, dev, cfg.train.precision, cfg.train.compile)
        # Fused Adam (one kernel over all parameters) on CPU and CUDA: on the 2-core CPU it takes
        # 0.5 ms a step where the default per-tensor loop takes 1.2 ms and foreach 1.4 ms. On CUDA it is
        # capturable, with the learning rate in a device tensor that a CUDA graph reads at replay.
        cuda = dev.type == "cuda"
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=torch.tensor(cfg.optim.lr, device=dev) if cuda else cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            fused=True,
            capturable=cuda,
        )
        self.model, self.optimizer = prepare(acc, model, optimizer, graphs)
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)
        self.plan = BatchPlan(
            n=len(train),
            batch_size=cfg.train.batch_size,
            micro=self.micro,
            accum=self.accum,
            rank=acc.process_index,
            world=P,
            seed=cfg.train.seed,
            device=dev,
        )
        self.steps_per_epoch = self.plan.steps_per_epoch
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        # What one optimizer step computes, eager or as one CUDA graph.
        self.step_fn = TrainStep(cfg, acc, self.model, self.optimizer, self.train_images, self.plan, graphs)

        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps taken in the current epoch
        self.saved_step = 0  # the step of the newest checkpoint (0: none, nothing trained yet either)
        self.best_test_elbo = math.inf
        self.fp16_skipped = 0  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients)
        self.tracker_run_id: str | None = None
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self.tracker = Tracker()
        self.figures: FigureDrawer | None = None  # main process: created when training starts (train())
        # On NCCL the stop flag is agreed over a gloo group, so the check never syncs the GPU stream.
        self.flag_group = dist.new_group(backend="gloo") if P > 1 and dist.get_backend() != "gloo" else None
        # The logging window: steps window_start[1] + 1 .. step, whose loss sums are rows of step_fn.rows.
        self.window_start = (time.perf_counter(), 0)
        self.checked_step = 0  # steps up to this one passed the health check
        self.nonfinite_run = 0  # consecutive non-finite steps up to checked_step

        self.resume()
        self.startup["model"] = time.perf_counter() - clock

    def release(self) -> None:
        """Let another run use run.dir (the kernel also drops the lock when the process dies)."""
        if self.lock is not None:
            self.lock.release()

    def on_main(self, action):
        """`action()` on the main process; the others get None. An error there (a refused run.dir) is
        raised on every rank, so that no rank waits in a collective for one that gave up."""
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except (ConfigError, RunLocked) as err:
                error = err
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([None if error is None else str(error)])[0]
            if message is not None and error is None:
                error = ConfigError(message)
        if error is not None:
            raise error
        return result

    # ---------------------------------------------------------------- the algorithm
    def fit(self) -> dict[str, float]:
        """Train to train.epochs (or train.max_steps), evaluating and checkpointing on the way.

        A stop signal ends the training early with a checkpoint (the summary says `preempted`); one
        that arrives after the last optimizer step lets the final evaluation, checkpoint and export
        finish (seconds), so the run ends finished. See vae_dist.signals."""
        own = not self.signals.installed  # vae-train installed them at its start; a notebook or test has not
        if own:
            self.signals.install()
        self.signals.on_first = self.on_signal
        self.signals.defer()
        try:
            return self.train()
        except BaseException:
            with contextlib.suppress(CheckpointError):  # finish a save in flight; report the first error
                self.writer.wait()
            raise
        finally:
            if own:
                self.signals.uninstall()
            self.release()

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        self.run_started = time.perf_counter()
        self.prepare_run_dir()
        self.start_tracking()
        if self.is_main:
            self.figures = self.figure_drawer()
        self.console.start(cfg.train.epochs, self.steps_per_epoch, self.epoch, self.step_in_epoch)
        t0, start_step = time.perf_counter(), self.step
        self.startup["run.dir and tracker"] = t0 - self.run_started
        test = {}
        try:
            while not self.trained_out():
                self.console.new_epoch(self.epoch, self.steps_per_epoch)
                self.console.advance_steps(self.step_in_epoch)
                for _ in self.optimizer_steps():
                    if self.stop_requested():
                        return self.preempt()
                    if self.reached_max_steps():
                        break
                self.close_epoch()
                test = self.end_epoch()
                if not self.trained_out() and self.stop_requested():  # a signal during the epoch-end work
                    return self.preempt()
        finally:
            self.console.stop()
        loop_end = time.perf_counter()
        elapsed = loop_end - t0
        if not test:  # resumed from the final checkpoint of a finished run: nothing left to train
            test = self.evaluate()
        self.save_checkpoint()  # always at the end (replaces an epoch checkpoint of the same step)
        path = self.export_model()
        if self.cfg.tracking.log_model:
            self.tracker.log_model(path)
        self.saves_ok(wait=True)
        self.log_figures(finish=True)  # the last draw ran meanwhile
        return self.summary(test, elapsed, start_step, loop_end)

    def trained_out(self) -> bool:
        """No optimizer step is left: all epochs done, or train.max_steps reached."""
        return self.epoch >= self.cfg.train.epochs or self.reached_max_steps()

    def optimizer_steps(self):
        """Train the rest of the current epoch, pausing after each optimizer step (one global batch)."""
        batches = self.step_fn.epoch_batches(self.plan.epoch(self.epoch))  # this rank's pixels, the whole epoch
        for s in range(self.step_in_epoch, self.steps_per_epoch):
            self.train_step(batches[s])
            self.after_optimizer_step()
            yield

    def close_epoch(self) -> None:
        """Count the epoch as completed when all its steps ran (a max_steps stop leaves it open)."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def train_step(self, x: torch.Tensor) -> None:
        """One optimizer step on this rank's pixels [accum, micro, 784] (see vae_dist.step)."""
        self.step_fn.set_lr(self.cfg.optim.lr_at(self.step, self.total_steps))
        self.step_fn.run(self.step, x)

    def after_optimizer_step(self) -> None:
        cfg = self.cfg
        self.step += 1
        self.step_in_epoch += 1
        if cfg.train.precision == "fp16" and self.accelerator.optimizer_step_was_skipped:
            self.fp16_skipped += 1  # a Python bool: GradScaler.step already synced to decide
        if self.step % cfg.tracking.log_every_steps == 0:
            self.check_health()
            self.log_train()
            self.saves_ok(wait=False)  # a background save that failed stops the run now, not at the next save
            self.log_figures()  # figures a worker finished meanwhile
        if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()

    def end_epoch(self) -> dict[str, float]:
        started = time.perf_counter()
        test = self.evaluate()
        self.best_test_elbo = min(self.best_test_elbo, test["elbo"])
        self.log_test(test)
        every = self.cfg.tracking.images_every_epochs
        last = self.epoch >= self.cfg.train.epochs or self.reached_max_steps()
        if last or (every and self.step_in_epoch == 0 and self.epoch % every == 0):
            self.draw_figures()
        every = self.cfg.checkpoint.every_epochs
        if every and self.step_in_epoch == 0 and self.epoch % every == 0 and self.epoch < self.cfg.train.epochs:
            self.save_checkpoint()  # the last epoch is saved by fit() itself
        # Train examples/s measures training: its clock stops during evaluation, pictures and saving.
        t_start, step_start = self.window_start
        self.window_start = (t_start + time.perf_counter() - started, step_start)
        return test

    def reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def evaluate(self) -> dict[str, float]:
        """Test-split terms per example, exact on any process count (see vae_dist.evaluate)."""
        model = self.accelerator.unwrap_model(self.model)
        return evaluate_elbo(
            model,
            self.test_images,
            self.accelerator,
            seed=self.cfg.train.seed,
            batch_size=self.cfg.train.eval_batch_size,
            k=self.cfg.model.k,
            objective=self.cfg.model.objective,
        )

    # ---------------------------------------------------------------- health and signals
    def check_health(self) -> None:
        """Raise when the loss was non-finite for train.max_nonfinite consecutive steps (checked at the
        logging interval and before each checkpoint, so a checkpoint never holds diverged weights)."""
        first, last = self.checked_step - self.window_start[1], self.step - self.window_start[1]
        if last == first:
            return
        # A step is finite when its (recon, kl) sums are, on every rank: all ranks must reach the same
        # verdict, or one would raise while the others wait in a collective.
        ok = torch.isfinite(self.step_fn.rows[first:last, 2:]).int()
        finite = (self.accelerator.reduce(ok, reduction="sum") == self.accelerator.num_processes).tolist()
        for i, row in enumerate(finite):  # [recon ok, kl ok] of each step, as Python bools
            self.nonfinite_run = 0 if all(row) else self.nonfinite_run + 1
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                step = self.checked_step + i + 1
                term = " and ".join(t for t, ok in zip(("recon", "kl"), row) if not ok)
                last = resolve_resume("auto", self.run_dir) if self.run_dir.exists() else None
                raise NonFiniteLossError(
                    f"the training loss was not finite for {self.nonfinite_run} consecutive optimizer steps, up to "
                    f"step {step} (non-finite term: {term}). The last good weights are in "
                    f"{last or 'no checkpoint (none was saved yet)'}. Lower optim.lr, set optim.grad_clip, "
                    "or train in train.precision=no or bf16."
                )
        self.checked_step = self.step

    def on_signal(self, signum: int) -> None:
        """The first stop signal of the run (recorded by StopSignals): say what happens next."""
        self.console.print(
            f"received {signal_name(signum)}: checkpointing after this step, then exiting"
            if not self.trained_out()
            else f"received {signal_name(signum)}: the last step has run; finishing the final evaluation, "
            "checkpoint and export"
        )

    def stop_requested(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (one tiny all-reduce per step)."""
        return self.any_rank(self.signals.received is not None)

    def any_rank(self, flag: bool) -> bool:
        """`flag` of any rank, on every rank (on NCCL through a gloo group: no GPU stream sync)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        if self.flag_group is None:
            t = t.to(self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(t.item())

    def saves_ok(self, wait: bool) -> None:
        """Raise on every rank when the main process's background save failed (`wait`: also for the
        save in flight), so that no rank goes on into a collective the main process never joins."""
        error = self.writer.failure(wait) if self.is_main else None
        if self.any_rank(error is not None):
            raise error or CheckpointError(
                "the main process could not write a checkpoint (its message names the file); this process stops too."
            )

    def preempt(self) -> dict[str, float]:
        """Stop after a signal: save when a step ran since the last checkpoint, say so, end the run."""
        received = self.signals.received
        name = signal_name(received) if received is not None else "a signal"  # another rank got it
        if self.step > self.saved_step:
            path = self.save_checkpoint()
            what = f"checkpoint saved to {path}"
        elif self.step > 0:
            path = checkpoints_dir(self.run_dir) / f"step-{self.step:08d}"
            what = f"no step ran since the checkpoint {path}"
        else:
            path, what = None, "no optimizer step had run, so there was nothing to save"
        self.saves_ok(wait=True)  # on disk before the process says so and exits
        self.log_figures(finish=True)  # no half-written PNG left behind
        self.accelerator.wait_for_everyone()
        self.console.print(f"stopped by {name} at step {self.step}: {what}; resume with train.resume=auto")
        self.tracker.finish()
        self.accelerator.end_training()
        return {"preempted": True, "steps": self.step, "checkpoint": str(path) if path else None}

    # ---------------------------------------------------------------- logging
    def log_train(self) -> None:
        """Train scalars over the steps since the last log, averaged over all processes' examples."""
        acc = self.accelerator
        t_start, step_start = self.window_start
        steps = self.step - step_start
        examples = steps * self.micro * self.accum  # this rank's
        sums = self.step_fn.rows[:steps].sum(0)
        sums = acc.reduce(torch.cat([sums, sums.new_tensor([examples])]), reduction="sum")
        values = (sums[:-1] / sums[-1]).tolist()  # the host sync of the logging interval
        record = {
            "split": "train",
            "epoch": self.epoch,
            "step": self.step,
            **dict(zip(TERMS, values)),
            "lr": self.cfg.optim.lr_at(self.step - 1, self.total_steps),  # that of the last step
            "grad_norm": float(self.step_fn.grad_norm()),
            "fp16_skipped_steps": self.fp16_skipped,
            "examples_per_s": steps * self.cfg.train.batch_size / max(time.perf_counter() - t_start, 1e-9),
        }
        self.step_fn.reset_rows()
        self.window_start = (time.perf_counter(), self.step)
        if self.is_main:
            self.metrics.write(record)
            self.tracker.log({f"train/{k}": v for k, v in record.items() if k != "split"}, step=self.step)
        self.console.advance_steps(
            steps, f"step {self.step}  elbo {record['elbo']:.2f}  {record['examples_per_s']:.0f} ex/s"
        )

    def log_test(self, test: dict[str, float]) -> None:
        record = {"split": "test", "epoch": self.epoch, "step": self.step, **test}
        if self.is_main:
            self.metrics.write(record)
            self.tracker.log({f"test/{k}": v for k, v in record.items() if k != "split"}, step=self.step)
        self.console.end_epoch(
            f"epoch {self.epoch}  test elbo {test['elbo']:.2f}  (recon {test['recon']:.2f}, kl {test['kl']:.2f})"
        )

    def summary(self, test: dict[str, float], elapsed: float, start_step: int, loop_end: float) -> dict[str, float]:
        """The run's numbers and where its wall time went: start-up, the loop, the work after it."""
        now = time.perf_counter()
        s = {
            "final_test_elbo": test.get("elbo", math.nan),
            "best_test_elbo": self.best_test_elbo,
            "steps": self.step,
            "seconds": elapsed,  # the training loop, epoch-end evaluation, pictures and checkpoints included
            "examples_per_s": (self.step - start_step) * self.cfg.train.batch_size / max(elapsed, 1e-9),
            "startup_seconds": loop_end - elapsed - self.started,
            "startup": dict(self.startup),
            "final_seconds": now - loop_end,  # final evaluation, checkpoint, export, pictures
            "step": self.step_fn.describe(),
        }
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.startup.items())
        self.console.table(
            "vae_dist run",
            [
                ("final test elbo", f"{s['final_test_elbo']:.2f} nats"),
                ("best test elbo", f"{s['best_test_elbo']:.2f} nats"),
                ("optimizer steps", f"{self.step} ({s['step']})"),
                ("start-up", f"{s['startup_seconds']:.1f} s ({phases})"),
                ("training loop", f"{elapsed:.1f} s, evaluation, pictures and checkpoints included"),
                ("after the loop", f"{s['final_seconds']:.1f} s (final evaluation, checkpoint, export)"),
                ("throughput", f"{s['examples_per_s']:.0f} examples/s"),
                ("run directory", str(self.run_dir)),
            ],
        )
        self.tracker.finish()
        self.accelerator.end_training()
        return s

    # ---------------------------------------------------------------- files
    def prepare_run_dir(self) -> None:
        """Save the resolved config; drop metrics a resumed run will log again (main process)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            self.metrics.truncate_after(self.step)
        self.accelerator.wait_for_everyone()

    def start_tracking(self) -> None:
        """W&B on the main process (no-op elsewhere or with tracking.mode=off); a resumed run continues
        the W&B run whose id its checkpoint holds."""
        acc = self.accelerator
        run_info = {
            "num_processes": acc.num_processes,
            "precision": self.cfg.train.precision,
            "accumulation_steps": self.accum,
            "micro_batch_size": self.micro,
            "device": str(acc.device),
        }
        self.tracker = start_tracker(self.cfg, acc, self.run_dir, self.tracker_run_id, run_info)
        self.tracker_run_id = self.tracker.run_id or self.tracker_run_id

    def draw_figures(self) -> None:
        """PNGs in run.dir (reconstructions, prior samples, latent space, loss curves), sent to the
        tracker: drawn in place on a CPU run, by a worker process while training goes on on a GPU."""
        if not self.is_main:
            return
        if self.figures is None:
            self.figures = self.figure_drawer()
        self.figures.submit(self.accelerator.unwrap_model(self.model), self.metrics.read(), self.step)
        self.log_figures()

    def figure_drawer(self) -> FigureDrawer:
        """In place on a CPU run; on a GPU a worker process (started now, so that its imports overlap
        the first epochs) draws while training goes on."""
        return FigureDrawer(
            self.test_images,
            self.test_labels,
            self.run_dir,
            seed=self.cfg.train.seed,
            steps_per_epoch=self.steps_per_epoch,
            background=self.accelerator.device.type == "cuda",
        )

    def log_figures(self, finish: bool = False) -> None:
        """Send the figures drawn so far to the tracker (W&B steps only go forward: at the current
        step, captioned with the step they show); `finish` waits for the last ones and stops the worker."""
        if self.figures is None:
            return
        done = self.figures.close() if finish else self.figures.collect()
        for paths, drawn_at in done:
            images = {k: v for k, v in paths.items() if k != "loss"}
            self.tracker.log_images(images, step=self.step, drawn_at=drawn_at)
        if finish:
            self.figures = None

    def save_checkpoint(self) -> Path:
        """All ranks: agree on health, gather RNG states; the main process snapshots the state and
        writes it atomically in the background (CheckpointWriter), while training goes on."""
        acc = self.accelerator
        self.saves_ok(wait=True)  # the previous save is on disk (or its failure stops every rank)
        self.check_health()
        rng = {"rng_cpu": torch.get_rng_state()}
        if acc.device.type == "cuda":
            rng["rng_cuda"] = torch.cuda.get_rng_state()
        # Per-rank state: RNG and this rank's loss sums of the logging window, one row per rank.
        per_rank = {**rng, "rows": self.step_fn.rows}
        per_rank = {k: acc.gather(v.to(acc.device)).reshape(acc.num_processes, -1).cpu() for k, v in per_rank.items()}
        path = checkpoints_dir(self.run_dir) / f"step-{self.step:08d}"
        if self.is_main:
            model = acc.unwrap_model(self.model)
            state = {
                "format": 2,  # 2: data order from vae_dist.step.BatchPlan, lr from the step, window rows
                "step": self.step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "best_test_elbo": None if math.isinf(self.best_test_elbo) else self.best_test_elbo,
                "fp16_skipped": self.fp16_skipped,
                "window_start_step": self.window_start[1],
                "log_every_steps": self.cfg.tracking.log_every_steps,  # rows per rank in trainer.safetensors
                "nonfinite_run": self.nonfinite_run,
                "num_processes": acc.num_processes,
                "tracker_run_id": self.tracker_run_id,
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "config": self.cfg.to_dict(),
                "versions": {
                    "vae_dist": vae_dist.__version__,
                    "torch": torch.__version__,
                    "accelerate": accelerate.__version__,
                    "python": sys.version.split()[0],
                },
            }
            path = self.writer.submit(
                self.run_dir,
                self.step,
                model_state=model.state_dict(),
                model_config=model.config_dict,
                optimizer_state=self.step_fn.optimizer_state(),
                trainer_tensors=per_rank,
                state=state,
                keep=self.cfg.checkpoint.keep,
            )
        self.saved_step = self.step
        return path

    def resume(self) -> None:
        """Load train.resume (auto: the newest valid checkpoint in run.dir) into every rank."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.train.resume == "none" and any(checkpoints_dir(self.run_dir).glob("step-*")):
            raise ConfigError(
                f"train.resume=none but {checkpoints_dir(self.run_dir)} already holds checkpoints that a fresh run "
                "would mix with its own; resume them with train.resume=auto, or choose a new run.dir."
            )
        with warnings.catch_warnings():
            if not self.is_main:
                warnings.simplefilter("ignore")  # the main process reports skipped checkpoints once
            path = resolve_resume(cfg.train.resume, self.run_dir)
        if path is None:
            return
        ckpt = load_checkpoint(path)
        model = acc.unwrap_model(self.model)
        check_model_shapes(model.state_dict(), ckpt.model, path / "model.safetensors")
        model.load_state_dict(ckpt.model)
        self.step_fn.load_optimizer(ckpt.optimizer)
        s = ckpt.state
        if s.get("format", 1) < 2 and s["step_in_epoch"] > 0:
            warnings.warn(
                f"{path} was written by vae_dist before the batch plan of vae_dist.step (checkpoint format "
                f"{s.get('format', 1)}): the rest of epoch {s['epoch'] + 1} follows the new data order, so "
                "this resume is not bit-exact with the run that wrote it (every later epoch is complete).",
                stacklevel=2,
            )
        if acc.scaler is not None and s["scaler"]:
            acc.scaler.load_state_dict(s["scaler"])
        # Global RNG states are restored for same-topology resumes; no training draw uses them (all
        # noise is seeded by step), so a resume on another process count is exact too.
        # The logging window restarts empty on another topology or logging interval (only the train
        # scalars of that one interval then cover fewer steps).
        rank, rows = acc.process_index, self.step_fn.rows
        if ckpt.trainer["rng_cpu"].shape[0] == acc.num_processes:
            torch.set_rng_state(ckpt.trainer["rng_cpu"][rank].clone())
            if acc.device.type == "cuda" and "rng_cuda" in ckpt.trainer:
                torch.cuda.set_rng_state(ckpt.trainer["rng_cuda"][rank].clone())
        saved = ckpt.trainer.get("rows")
        if saved is not None and saved.shape == (acc.num_processes, rows.numel()):
            rows.copy_(saved[rank].view_as(rows))
            self.step_fn.reset_rows(used=s["step"] - s["window_start_step"])
            self.window_start = (time.perf_counter(), s["window_start_step"])
        else:
            self.window_start = (time.perf_counter(), s["step"])
        self.step, self.epoch, self.step_in_epoch = s["step"], s["epoch"], s["step_in_epoch"]
        self.saved_step = self.step
        self.best_test_elbo = math.inf if s["best_test_elbo"] is None else s["best_test_elbo"]
        self.fp16_skipped, self.nonfinite_run = s["fp16_skipped"], s["nonfinite_run"]
        self.checked_step = self.step
        self.tracker_run_id = s["tracker_run_id"]
        self.console.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch})")

    def export_model(self) -> Path:
        """model.safetensors + config.json in run.dir, loadable with VAE.from_pretrained(run.dir)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            acc.unwrap_model(self.model).save_pretrained(self.run_dir)
        acc.wait_for_everyone()
        return self.run_dir / "model.safetensors"


__all__ = ["Trainer", "LaunchError", "NonFiniteLossError", "CheckpointError"]
