"""The training loop: Accelerate around the VAE/ELBO core.

`Trainer.train` reads like the algorithm: for each epoch, for each global batch, take an optimizer
step; evaluate; checkpoint. The work behind its lines belongs to components that own their state,
and the loop only asks them whether it is their turn:

- `vae_dist.step.TrainStep`: what one optimizer step computes, eager or as one CUDA graph;
- `vae_dist.window.LogWindow`: the logging window the step fills, and the loss's health;
- `vae_dist.report.Report`: the records, the tracker, the console, the figures, the summary;
- `vae_dist.checkpoint.CheckpointManager`: when to save, save, resume, the background writer;
- `vae_dist.run.Run`: the process group, run.dir and its lock, stop signals, and the one end of the
  run, which releases what the trainer registered (`Run.hold`) in reverse of how it was built.

The trainer's own state is three counters (`state_dict`). Rank discipline: every method runs on all
ranks; the components decide what only the main process does (files, console, tracker).
"""

from __future__ import annotations

import time

from vae_dist.batches import BatchPlan
from vae_dist.build import build_model_and_optimizer, pixel_means, wants_graphs
from vae_dist.checkpoint import CheckpointManager, CheckpointWriter, RNGState
from vae_dist.config import Config, ConfigError
from vae_dist.data import Split, load_data
from vae_dist.evaluation import TestEvaluation
from vae_dist.report import MetricsFileError, Report
from vae_dist.run import Run
from vae_dist.signals import StopSignals, signal_name
from vae_dist.step import TrainStep
from vae_dist.window import LogWindow


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
        self.cfg, clock = cfg, time.perf_counter()
        self.started = started or clock
        self.run = Run(cfg, signals)  # the process group, the Accelerator, run.dir's lock
        try:  # from here every way out, a stop signal included, goes through close()
            self.accelerator, self.run_dir = self.run.accelerator, self.run.dir
            # Seconds per start-up phase: imports before the Trainer, process group and devices, data, model.
            self.startup = {"imports": clock - self.started, "devices": time.perf_counter() - clock}
            self.step = self.epoch = self.step_in_epoch = 0  # optimizer steps; epochs completed; steps into this one
            self.setup(train, test)
        except BaseException:
            self.close()
            raise

    def setup(self, train: Split | None, test: Split | None) -> None:
        """Data on the device; the components, each registered with the run as it is built; the resume."""
        cfg, acc, run, clock = self.cfg, self.accelerator, self.run, time.perf_counter()
        train, test, means = device_splits(cfg, acc, train, test)
        self.train_images, self.test_images = train.images, test.images
        self.startup["data"], clock = time.perf_counter() - clock, time.perf_counter()
        graphs = wants_graphs(cfg.train.cuda_graphs, acc.device, cfg.train.precision, cfg.train.compile)
        self.model, self.optimizer = build_model_and_optimizer(cfg, acc, train.images.shape[1], graphs, means)
        self.plan = BatchPlan.of(cfg, acc, len(train), run.micro, run.accum)
        self.steps_per_epoch = self.plan.steps_per_epoch
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.window = LogWindow(cfg, acc, self.run_dir)
        self.test_evaluation = TestEvaluation(cfg, acc, self.test_images)
        self.report = Report(cfg, acc, self.run_dir, self.test_images, test.labels, self.steps_per_epoch)
        self.console = self.report.console
        run.hold("the tracker", lambda: self.report.close_tracker())
        run.hold("the figure worker", lambda: self.report.close_figures(self.step))
        writer = CheckpointWriter()
        run.hold("the checkpoint writer", writer.close)
        self.step_fn = TrainStep(
            cfg, acc, self.model, self.optimizer, self.train_images, self.plan, graphs, self.window
        )
        run.hold("the captured step", self.step_fn.release_graph)
        run.hold("device work", run.synchronize)
        # What a checkpoint holds, declared once: each component's own state, under its own name.
        states = {"train": self, "step": self.step_fn, "window": self.window, "report": self.report}
        states["rng"] = RNGState(acc.device)
        self.checkpoints = CheckpointManager(
            cfg, acc, self.model, self.step_fn, states, writer, agree=run.any_rank, check=self.check_before_save
        )
        self.resume()
        self.startup["model"] = time.perf_counter() - clock

    def resume(self) -> None:
        """Load the checkpoint train.resume names, and bring metrics.jsonl to its step."""
        resumed = self.checkpoints.resume()
        offer = self.checkpoints.earlier_than(resumed)  # None for a checkpoint of another run.dir
        every = self.window.resumed_log_every
        self.run.on_main(
            lambda: self.report.keep_records_through(self.step, self.epoch, offer, every), MetricsFileError
        )
        if resumed and not self.finished():
            self.console.print(
                f"resumed from {resumed} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch})"
            )

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]

    # ---------------------------------------------------------------- the algorithm
    def fit(self) -> dict[str, float]:
        """Train to train.epochs (or train.max_steps), then end the run (`close`), on every path. A stop
        signal ends it early with a checkpoint (`preempted`); after the last step it lets the final
        evaluation, checkpoint and export finish. See vae_dist.signals."""
        try:
            result = self.train()
        finally:
            self.close()
        if "final_test_elbo" in result:
            self.report.print_summary(result)  # last on screen, after what the tracker prints as it finishes
        return result

    def train(self) -> dict[str, float]:
        run_started = time.perf_counter()
        self.run.start(on_signal=lambda signum: self.report.signal_received(signum, self.all_steps_taken()))
        if self.finished():
            return self.report.nothing_to_train(self.step)
        info = self.run.info(accumulation_steps=self.run.accum, micro_batch_size=self.run.micro)
        self.report.start(info, self.epoch, self.step_in_epoch, oversubscribed=self.run.oversubscribed)
        t0, start_step, test = time.perf_counter(), self.step, {}
        self.startup["run.dir and tracker"] = t0 - run_started
        try:
            while not self.all_steps_taken():
                self.console.new_epoch(self.epoch, self.steps_per_epoch)
                self.console.advance_steps(self.step_in_epoch)
                for _ in self.optimizer_steps():
                    if self.run.should_stop(self.step):
                        return self.preempt()
                    if self.reached_max_steps():
                        break
                self.close_epoch()
                test = self.end_epoch()
                if not self.all_steps_taken() and self.run.stop_agreed():  # a signal during the epoch-end work
                    return self.preempt()
        finally:
            self.console.stop()
        loop_end = time.perf_counter()
        test = test or self.evaluate()  # resumed from the final checkpoint, without its export: nothing to train
        self.checkpoints.save(self.step)  # always at the end (replaces an epoch checkpoint of the same step)
        path = self.checkpoints.export()
        if self.cfg.tracking.log_model:
            self.report.tracker.log_model(path)
        self.checkpoints.check_writer(wait=True)
        times = {"started": self.started, "loop": loop_end - t0, "loop_end": loop_end, "startup": self.startup}
        return self.report.summary(
            test, step=self.step, start_step=start_step, times=times, info=info, describe=self.step_fn.describe()
        )

    def all_steps_taken(self) -> bool:
        """No optimizer step is left: all epochs done, or train.max_steps reached."""
        return self.epoch >= self.cfg.train.epochs or self.reached_max_steps()

    def finished(self) -> bool:
        """Trained out and exported (a crash between the final checkpoint and the export leaves the export to do)."""
        return self.all_steps_taken() and (self.run_dir / "model.safetensors").exists()

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
        if self.window.due(self.step):
            completed = self.epoch + (self.step_in_epoch == self.steps_per_epoch)  # an epoch's last step completes it
            lr, kl = self.cfg.optim.lr_at(self.step - 1, self.total_steps), self.cfg.model.kl_weight_at(self.step - 1)
            self.report.log_train(*self.window.close(self.step, completed, lr, kl, self.step_fn))
            self.checkpoints.check_writer(wait=False)  # a failed background save stops the run now
            self.report.log_figures(self.step)  # figures a worker finished meanwhile
        if self.checkpoints.due(self.step):
            self.checkpoints.save(self.step)

    def check_before_save(self, step: int) -> None:
        """What a checkpoint needs first: the records it covers on disk, and healthy weights (every rank agrees)."""
        self.report.sync()
        self.window.check(step)

    def close_epoch(self) -> None:
        """Count the epoch as completed when all its steps ran (a max_steps stop leaves it open)."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def end_epoch(self) -> dict[str, float]:
        started = time.perf_counter()
        test = self.evaluate()
        self.report.log_test(test, self.step, self.epoch, self.step_in_epoch)
        every = self.cfg.tracking.images_every_epochs
        if self.all_steps_taken() or (every and self.step_in_epoch == 0 and self.epoch % every == 0):
            self.report.draw_figures(self.accelerator.unwrap_model(self.model), self.step)
        if self.step_in_epoch == 0 and self.checkpoints.due(self.step, epochs_done=self.epoch):
            self.checkpoints.save(self.step)
        self.window.pause_clock(started)
        return test

    def evaluate(self) -> dict[str, float]:
        return self.test_evaluation(self.accelerator.unwrap_model(self.model))

    # ---------------------------------------------------------------- stopping and ending
    def preempt(self) -> dict[str, float]:
        """Stop after a signal: save when a step ran since the last checkpoint (on disk before the
        process says so), and say how to go on."""
        received = self.run.signals.received
        name = signal_name(received) if received is not None else "a signal"  # another rank got it
        path, what = self.checkpoints.save_at_stop(self.step)
        self.accelerator.wait_for_everyone()
        self.console.print(f"stopped by {name} at step {self.step}: {what}; rerun the same command to resume")
        return {"preempted": True, "steps": self.step, "checkpoint": str(path) if path else None}

    def close(self) -> None:
        """The one end of a run, on every path (finished, preempted, failed, stopped during start-up):
        the run releases what it holds in reverse of how it was built (vae_dist.run)."""
        self.run.end()


def device_splits(cfg: Config, accelerator, train: Split | None, test: Split | None):
    """The splits on the device, as uint8 (47 MB for MNIST; each epoch's batches are gathered from them
    in one operation, vae_dist.step), loaded when not given (a download once per machine); and the
    training split's pixel means where model.init_output_bias asks for them (else None)."""
    if train is None:
        with accelerator.main_process_first():
            train, test = load_data(cfg.data)
    if len(train) < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {len(train)} training examples; "
            "lower train.batch_size."
        )
    means = pixel_means(train.images) if cfg.model.init_output_bias else None  # the split every rank holds
    dev = accelerator.device
    return Split(train.images.to(dev), train.labels), Split(test.images.to(dev), test.labels), means
