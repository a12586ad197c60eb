"""The training loop: Accelerate around the VAE/ELBO core.

`Trainer.train` reads like the algorithm: for each epoch, for each global batch, take an optimizer
step; evaluate; checkpoint. The work behind its lines belongs to components that own their state,
and the loop only asks them whether it is their turn:

- `vae_dist.step.TrainStep`: what one optimizer step computes, eager or as one CUDA graph;
- `vae_dist.metrics.Metrics`: the logging window, health, records, tracker, figures, summary;
- `vae_dist.checkpoint.CheckpointManager`: when to save, save, resume, the background writer;
- `vae_dist.run.Run`: the process group, run.dir and its lock, stop signals, the one ordered end.

The trainer's own state is three counters (`state_dict`). Rank discipline: every method runs on all
ranks; the components decide what only the main process does (files, console, tracker).
"""

from __future__ import annotations

import time

from vae_dist.checkpoint import CheckpointError, CheckpointManager, RNGState, checkpoints_dir, latest_valid
from vae_dist.config import Config, ConfigError
from vae_dist.data import Split, load_data
from vae_dist.evaluate import evaluate_elbo
from vae_dist.metrics import Metrics, MetricsFileError, NonFiniteLossError
from vae_dist.processes import LaunchError
from vae_dist.run import Run
from vae_dist.signals import StopSignals, signal_name
from vae_dist.step import BatchPlan, TrainStep, build_model_and_optimizer, pixel_means, wants_graphs


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
        clock = time.perf_counter()
        self.started = started or clock
        self.run = Run(cfg, signals)  # the process group, the Accelerator, run.dir's lock
        self.accelerator, self.accum, self.micro = self.run.accelerator, self.run.accum, self.run.micro
        self.is_main, self.run_dir = self.accelerator.is_main_process, self.run.dir
        self.step_fn = self.checkpoints = self.metrics = None  # built by setup; close() skips what is not
        # Seconds per start-up phase: imports before the Trainer, process group and devices, data, model.
        self.startup = {"imports": clock - self.started, "devices": time.perf_counter() - clock}
        try:
            self.setup(train, test)
        except BaseException:
            self.close()
            raise

    def setup(self, train: Split | None, test: Split | None) -> None:
        """Data on the device; model, optimizer and the step; the components; then the resume."""
        cfg, acc = self.cfg, self.accelerator
        dev = acc.device
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
        self.train_images, self.test_images = train.images.to(dev), test.images.to(dev)
        self.startup["data"] = time.perf_counter() - clock

        clock = time.perf_counter()
        graphs = wants_graphs(cfg.train.cuda_graphs, dev, cfg.train.precision, cfg.train.compile)
        means = pixel_means(train.images) if cfg.model.init_output_bias else None  # the split every rank holds
        self.model, self.optimizer = build_model_and_optimizer(cfg, acc, train.images.shape[1], graphs, means)
        P = acc.num_processes
        self.plan = BatchPlan(
            len(train), cfg.train.batch_size, self.micro, self.accum, acc.process_index, P, cfg.train.seed, dev
        )
        self.steps_per_epoch = self.plan.steps_per_epoch
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.step_fn = TrainStep(cfg, acc, self.model, self.optimizer, self.train_images, self.plan, graphs)
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps taken in the current epoch
        self.metrics = Metrics(
            cfg, acc, self.step_fn, self.run_dir, self.test_images, test.labels, self.steps_per_epoch
        )
        self.console = self.metrics.console
        # What a checkpoint holds, declared once: each component's state_dict, next to model and optimizer.
        states = {"train": self, "step": self.step_fn, "metrics": self.metrics, "rng": RNGState(dev)}
        self.checkpoints = CheckpointManager(
            cfg, acc, self.model, self.step_fn, states, agree=self.run.any_rank, check=self.metrics.check_before_save
        )
        resumed = self.checkpoints.resume()
        # A checkpoint of this run.dir covers the records up to its step; one from elsewhere (a warm
        # start with train.resume=PATH) starts this run.dir's records at its step.
        own = resumed is not None and resumed.resolve().parent == checkpoints_dir(self.run_dir).resolve()
        earlier = lambda step: latest_valid(self.run_dir, warn=False, at_most=step)  # noqa: E731
        self.run.on_main(
            lambda: self.metrics.keep_through(self.step, self.epoch, earlier if own else None),
            MetricsFileError,
        )
        if resumed and not self.finished():
            where = f"epoch {self.epoch}, step {self.step_in_epoch}"
            self.console.print(f"resumed from {resumed} at step {self.step} ({where})")
        self.startup["model"] = time.perf_counter() - clock

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]

    # ---------------------------------------------------------------- the algorithm
    def fit(self) -> dict[str, float]:
        """Train to train.epochs (or train.max_steps), evaluating and checkpointing on the way; then
        end the run (`close`), on every path.

        A stop signal ends the training early with a checkpoint (the summary says `preempted`); one
        that arrives after the last optimizer step lets the final evaluation, checkpoint and export
        finish (seconds), so the run ends finished. See vae_dist.signals."""
        try:
            result = self.train()
        finally:
            self.close()
        if "final_test_elbo" in result:
            self.metrics.print_summary(result)  # last on screen, after what the tracker prints as it finishes
        return result

    def train(self) -> dict[str, float]:
        self.run_started = time.perf_counter()
        self.run.start(on_signal=self.on_signal)
        if self.finished():
            return self.already_finished()
        info = self.run.info(accumulation_steps=self.accum, micro_batch_size=self.micro)
        self.metrics.start(info, self.epoch, self.step_in_epoch, crowded=self.run.crowded)
        t0, start_step = time.perf_counter(), self.step
        self.startup["run.dir and tracker"] = t0 - self.run_started
        test = {}
        try:
            while not self.trained_out():
                self.console.new_epoch(self.epoch, self.steps_per_epoch)
                self.console.advance_steps(self.step_in_epoch)
                for _ in self.optimizer_steps():
                    if self.run.should_stop(self.step):
                        return self.preempt()
                    if self.reached_max_steps():
                        break
                self.close_epoch()
                test = self.end_epoch()
                if not self.trained_out() and self.run.stop_agreed():  # a signal during the epoch-end work
                    return self.preempt()
        finally:
            self.console.stop()
        loop_end = time.perf_counter()
        if not test:  # resumed from the final checkpoint, without its export: nothing left to train
            test = self.evaluate()
        self.checkpoints.save(self.step)  # always at the end (replaces an epoch checkpoint of the same step)
        path = self.checkpoints.export()
        if self.cfg.tracking.log_model:
            self.metrics.tracker.log_model(path)
        self.checkpoints.check_writer(wait=True)
        times = {"started": self.started, "loop": loop_end - t0, "loop_end": loop_end, "startup": self.startup}
        return self.metrics.summary(
            test, step=self.step, start_step=start_step, times=times, info=info, describe=self.step_fn.describe()
        )

    def trained_out(self) -> bool:
        """No optimizer step is left: all epochs done, or train.max_steps reached."""
        return self.epoch >= self.cfg.train.epochs or self.reached_max_steps()

    def finished(self) -> bool:
        """A run that trained out and exported its model (a crash between the final checkpoint and
        the export leaves the export to do)."""
        return self.trained_out() and (self.run_dir / "model.safetensors").exists()

    def reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def optimizer_steps(self):
        """Train the rest of the current epoch, pausing after each optimizer step (one global batch)."""
        batches = self.step_fn.epoch_batches(self.plan.epoch(self.epoch))  # this rank's pixels, the whole epoch
        for s in range(self.step_in_epoch, self.steps_per_epoch):
            self.step_fn.set_lr(self.cfg.optim.lr_at(self.step, self.total_steps))
            self.step_fn.set_kl_weight(self.cfg.model.kl_weight_at(self.step))
            self.step_fn.run(self.step, batches[s])
            self.after_optimizer_step()
            yield

    def after_optimizer_step(self) -> None:
        self.step += 1
        self.step_in_epoch += 1
        if self.metrics.should_log(self.step):
            completed = self.epoch + (self.step_in_epoch == self.steps_per_epoch)  # an epoch's last step completes it
            self.metrics.log_train(
                self.step,
                completed,
                self.cfg.optim.lr_at(self.step - 1, self.total_steps),
                self.cfg.model.kl_weight_at(self.step - 1),
            )
            self.checkpoints.check_writer(wait=False)  # a failed background save stops the run now
            self.metrics.log_figures(self.step)  # figures a worker finished meanwhile
        if self.checkpoints.due(self.step):
            self.checkpoints.save(self.step)

    def close_epoch(self) -> None:
        """Count the epoch as completed when all its steps ran (a max_steps stop leaves it open)."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def end_epoch(self) -> dict[str, float]:
        started = time.perf_counter()
        test = self.evaluate()
        self.metrics.log_test(test, self.step, self.epoch, self.step_in_epoch)
        every = self.cfg.tracking.images_every_epochs
        if self.trained_out() or (every and self.step_in_epoch == 0 and self.epoch % every == 0):
            self.metrics.draw_figures(self.accelerator.unwrap_model(self.model), self.step)
        if self.step_in_epoch == 0 and self.checkpoints.due(self.step, epochs_done=self.epoch):
            self.checkpoints.save(self.step)
        self.metrics.pause_clock(started)
        return test

    def evaluate(self) -> dict[str, float]:
        """Test-split terms per example, exact on any process count (see vae_dist.evaluate)."""
        return evaluate_elbo(
            self.accelerator.unwrap_model(self.model),
            self.test_images,
            self.accelerator,
            seed=self.cfg.train.seed,
            batch_size=self.cfg.train.eval_batch_size,
            k=self.cfg.model.k,
            objective=self.cfg.model.objective,
        )

    # ---------------------------------------------------------------- stopping and ending
    def on_signal(self, signum: int) -> None:
        """The first stop signal of the run (recorded by StopSignals): say what happens next."""
        self.console.print(
            f"received {signal_name(signum)}: checkpointing after this step, then exiting"
            if not self.trained_out()
            else f"received {signal_name(signum)}: the last step has run; finishing the final evaluation, "
            "checkpoint and export"
        )

    def preempt(self) -> dict[str, float]:
        """Stop after a signal: save when a step ran since the last checkpoint (on disk before the
        process says so), and say how to go on."""
        received = self.run.signals.received
        name = signal_name(received) if received is not None else "a signal"  # another rank got it
        path, what = self.checkpoints.save_at_stop(self.step)
        self.accelerator.wait_for_everyone()
        self.console.print(f"stopped by {name} at step {self.step}: {what}; rerun the same command to resume")
        return {"preempted": True, "steps": self.step, "checkpoint": str(path) if path else None}

    def already_finished(self) -> dict[str, float]:
        """A rerun of a finished run: nothing to train, one line saying so."""
        self.console.print(
            f"{self.run_dir} holds a finished run ({self.step} optimizer steps); its model is "
            f"{self.run_dir / 'model.safetensors'}. Nothing to train: raise train.epochs to train on, or choose a new run.dir."
        )
        return {"finished_already": True, "steps": self.step}

    def close(self) -> None:
        """The one end of a run, on every path (finished, preempted, failed, stopped during start-up):
        what the run holds is released in this order (see vae_dist.run for why)."""
        self.run.end(
            [
                ("device work", self.run.synchronize),
                ("the captured step", self.step_fn and self.step_fn.release_graph),
                ("the checkpoint writer", self.checkpoints and self.checkpoints.close),
                ("the figure worker", self.metrics and (lambda: self.metrics.close_figures(self.step))),
                ("the tracker", self.metrics and self.metrics.close_tracker),
                ("the process group", self.run.destroy_process_group),
            ]
        )


__all__ = ["Trainer", "LaunchError", "NonFiniteLossError", "CheckpointError", "MetricsFileError"]
