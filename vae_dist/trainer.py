"""The training loop: Accelerate around the VAE/ELBO core.

Distributed, precision and rank concerns are settled in `Trainer.__init__`; `fit` reads like the
algorithm: for each epoch, for each global batch, take an optimizer step; evaluate; checkpoint.

Noise and determinism: every random draw of a training step (the reparameterisation noise eps and,
with data.binarize=dynamic, the Bernoulli pixels) is drawn for the *whole global batch* from a
generator seeded by (train.seed, optimizer step), and each process takes the slice of the examples
it holds. So an example gets the same noise whether it lands on rank 0 or 3, in micro-batch 0 or 1:
the process count, micro-batch size and accumulation steps change speed, never the result. The
data order is Accelerate's seedable sampler (train.seed + epoch), so a resumed run replays it exactly.

Rank discipline: every method runs on all ranks; only `self.is_main` writes files, prints (the
Console of other ranks is disabled) and talks to the tracker.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import accelerate
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration

import vae_dist
from vae_dist.checkpoint import (
    CheckpointError,
    check_model_shapes,
    checkpoints_dir,
    load_checkpoint,
    resolve_resume,
    write_checkpoint,
)
from vae_dist.config import Config, ConfigError
from vae_dist.console import Console
from vae_dist.data import Split, index_loader, load_data, to_unit
from vae_dist.evaluate import TERMS, evaluate_elbo, seed_for
from vae_dist.figures import write_figures
from vae_dist.model import VAE, loss_terms
from vae_dist.processes import LaunchError, check_launch, set_cpu_threads
from vae_dist.tracking import MetricsFile, Tracker, log_with, start_tracker

TRAIN_STREAM = 1  # noise stream id of training steps; evaluation uses EVAL_STREAM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for train.max_nonfinite consecutive optimizer steps."""


def build_state(cfg: Config) -> PartialState:
    """The process group. On a machine without CUDA, `cpu=True` gives a gloo group under
    `accelerate launch --multi_gpu`; a launcher that asked for N processes but reached one is refused."""
    state = PartialState(cpu=not torch.cuda.is_available())
    check_launch(state.num_processes)
    if state.device.type == "cpu":
        set_cpu_threads(cfg.train.cpu_threads, state.num_processes)
        # After ~700 steps, Adam's first moment of weights that almost never get a gradient (MNIST's
        # black border pixels, dead ReLU units) decays into float32's subnormal range, where every x86
        # operation on it is many times slower: a CPU run loses ~40% of its speed for no accuracy.
        # Worker threads copy this mode from the main thread when they start, so it is set before
        # the first parallel operation of `vae-train`.
        torch.set_flush_denormal(cfg.train.flush_denormal)
    return state


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of optim.lr after `step` optimizer steps: linear warm-up, then the schedule."""
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            t = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if o.schedule == "step":
            return o.step_gamma ** ((step - o.warmup_steps) // o.step_every)
        return 1.0

    return f


def check_writable(run_dir: Path) -> None:
    """Fail before training, not at the first save, when run.dir cannot be written."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"run.dir={run_dir} cannot be written ({err.strerror or err}); choose a folder you can write to."
        ) from err


class Trainer:
    def __init__(self, cfg: Config, train: Split | None = None, test: Split | None = None):
        self.cfg = cfg
        state = build_state(cfg)
        P = state.num_processes
        self.accum = cfg.train.accumulation_steps(P)  # raises ConfigError naming the numbers to change
        self.micro = cfg.train.micro_batch(P)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.precision,
            gradient_accumulation_steps=self.accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
            log_with=log_with(cfg.tracking),
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.console = Console(enabled=self.is_main)
        self.run_dir = Path(cfg.run.dir)

        if train is None:
            train, test = load_data(cfg.data)
        # The splits live on the device as uint8 (47 MB for MNIST): a batch is one index operation.
        self.train_images = train.images.to(acc.device)
        self.test_images = test.images.to(acc.device)
        self.test_labels = test.labels

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and topology
        model = VAE(x_dim=self.train_images.shape[1], hidden_dims=cfg.model.hidden_dims, z_dim=cfg.model.z_dim)
        # Fused Adam (one kernel over all parameters) on CPU and CUDA: on the 2-core CPU it takes
        # 0.5 ms a step where the default per-tensor loop takes 1.2 ms and foreach 1.4 ms.
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            fused=True,
        )
        loader = index_loader(len(train), self.micro)
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)

        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is larger than the {len(train)} training examples; "
                "lower train.batch_size."
            )
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        # Not prepared: a prepared scheduler steps once per process per call; ours steps once per
        # optimizer step, whatever the process count.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, lr_lambda(cfg, self.total_steps))

        self.noise = torch.Generator(device=acc.device)
        self.k = cfg.model.k
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps taken in the current epoch
        self.best_test_elbo = math.inf
        self.fp16_skipped = 0  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients)
        self.tracker_run_id: str | None = None
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self.tracker = Tracker()
        self.stop_signal: int | None = None
        # On NCCL the stop flag is agreed over a gloo group, so the check never syncs the GPU stream.
        self.flag_group = dist.new_group(backend="gloo") if P > 1 and dist.get_backend() != "gloo" else None
        self.window = torch.zeros(len(TERMS), device=acc.device)  # train terms summed since the last log
        self.window_count = 0
        self.window_start = (time.perf_counter(), 0)
        self.grad_norm = torch.tensor(math.nan)  # global gradient norm of the last logged step
        # Per-step finiteness of (recon, kl) since the last health check, written on the device and
        # read at the logging interval: no host sync per step.
        self.finite = torch.ones(cfg.tracking.log_every_steps, 2, dtype=torch.bool, device=acc.device)
        self.checked_step = 0
        self.nonfinite_run = 0  # consecutive non-finite steps up to checked_step

        if self.is_main:
            check_writable(self.run_dir)
        self.resume()

    # ---------------------------------------------------------------- the algorithm
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.prepare_run_dir()
        self.start_tracking()
        handlers = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        self.console.start(cfg.train.epochs, self.steps_per_epoch, self.epoch, self.step_in_epoch)
        t0, start_step = time.perf_counter(), self.step
        test = {}
        try:
            while self.epoch < cfg.train.epochs and not self.reached_max_steps():
                self.console.new_epoch(self.epoch, self.steps_per_epoch)
                self.console.advance_steps(self.step_in_epoch)
                for _ in self.optimizer_steps():
                    if self.stop_requested():
                        return self.preempt()
                    if self.reached_max_steps():
                        break
                self.close_epoch()
                test = self.end_epoch()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.console.stop()
        elapsed = time.perf_counter() - t0
        if not test:  # resumed from the final checkpoint of a finished run: nothing left to train
            test = self.evaluate()
        self.save_checkpoint()  # always at the end (replaces an epoch checkpoint of the same step)
        path = self.export_model()
        if self.cfg.tracking.log_model:
            self.tracker.log_model(path)
        return self.summary(test, elapsed, start_step)

    def optimizer_steps(self):
        """Train the rest of the current epoch, pausing after each optimizer step (one global batch)."""
        for micro, idx in enumerate(self.epoch_batches()):
            self.train_step(idx, micro % self.accum)
            if self.accelerator.sync_gradients:
                self.after_optimizer_step()
                yield

    def close_epoch(self) -> None:
        """Count the epoch as completed when all its steps ran (a max_steps stop leaves it open)."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def train_step(self, idx: torch.Tensor, micro: int) -> None:
        """One micro-batch: forward, backward; on the last micro-batch of a step, clip and update."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            x, eps = self.batch(idx, micro)
            with acc.autocast():
                terms = loss_terms(self.model, x, eps, self.cfg.model.objective)
            acc.backward(terms["loss"].mean())  # backward() divides by the accumulation steps
            if acc.sync_gradients and (self.cfg.optim.grad_clip > 0 or self.logs_after_this_step()):
                # The global gradient norm, measured (and clipped when asked) only when needed.
                self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Summed on the device; read only at the logging interval (no host sync per step).
        sums = torch.stack([terms[t].detach().sum() for t in TERMS])
        self.window += sums
        self.window_count += x.shape[0]
        row = self.finite[(self.step - self.checked_step) % self.finite.shape[0]]
        row &= torch.isfinite(sums[2:])  # (recon, kl) of every micro-batch of this step

    def batch(self, idx: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [0, 1] and noise for this process's slice of the current global batch."""
        acc = self.accelerator
        G = self.cfg.train.batch_size
        start = (micro * acc.num_processes + acc.process_index) * self.micro  # position in the global batch
        rows = slice(start, start + idx.shape[0])
        self.noise.manual_seed(seed_for(self.cfg.train.seed, TRAIN_STREAM, self.step))
        eps = torch.randn(G, self.k, self.cfg.model.z_dim, generator=self.noise, device=acc.device)[rows]
        x = to_unit(self.train_images[idx])
        if self.cfg.data.binarize == "dynamic":
            u = torch.rand(G, x.shape[1], generator=self.noise, device=acc.device)[rows]
            x = (u < x).float()
        return x, eps

    def logs_after_this_step(self) -> bool:
        return (self.step + 1) % self.cfg.tracking.log_every_steps == 0

    def after_optimizer_step(self) -> None:
        cfg = self.cfg
        self.step += 1
        self.step_in_epoch += 1
        self.scheduler.step()
        if cfg.train.precision == "fp16" and self.accelerator.optimizer_step_was_skipped:
            self.fp16_skipped += 1  # a Python bool: GradScaler.step already synced to decide
        if self.step % cfg.tracking.log_every_steps == 0:
            self.check_health()
            self.log_train()
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

    def epoch_batches(self):
        """This process's micro-batches of example indices for the current epoch, from the resume point."""
        self.loader.set_epoch(self.epoch)  # order = permutation seeded by train.seed + epoch
        skip = self.step_in_epoch * self.accum
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def evaluate(self) -> dict[str, float]:
        """Test-split terms per example, exact on any process count (see vae_dist.evaluate)."""
        model = self.accelerator.unwrap_model(self.model)
        return evaluate_elbo(
            model,
            self.test_images,
            self.accelerator,
            seed=self.cfg.train.seed,
            batch_size=self.cfg.train.eval_batch_size,
            k=self.k,
            objective=self.cfg.model.objective,
        )

    # ---------------------------------------------------------------- health and signals
    def check_health(self) -> None:
        """Raise when the loss was non-finite for train.max_nonfinite consecutive steps (checked at the
        logging interval and before each checkpoint, so a checkpoint never holds diverged weights)."""
        n = self.step - self.checked_step
        # All ranks must reach the same verdict, or one would raise while the others wait in a collective.
        finite = self.accelerator.reduce(self.finite[:n].int(), reduction="sum").cpu() == self.accelerator.num_processes
        self.finite.fill_(True)
        for i, row in enumerate(finite):
            self.nonfinite_run = 0 if bool(row.all()) else self.nonfinite_run + 1
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                step = self.checked_step + i + 1
                term = " and ".join(t for t, ok in zip(("recon", "kl"), row.tolist()) if not ok)
                last = resolve_resume("auto", self.run_dir) if self.run_dir.exists() else None
                raise NonFiniteLossError(
                    f"the training loss was not finite for {self.nonfinite_run} consecutive optimizer steps, up to "
                    f"step {step} (non-finite term: {term}). The last good weights are in "
                    f"{last or 'no checkpoint (none was saved yet)'}. Lower optim.lr, set optim.grad_clip, "
                    "or train in train.precision=no or bf16."
                )
        self.checked_step = self.step

    def on_signal(self, signum: int, frame) -> None:
        """Only records the request: the loop finishes its optimizer step, all ranks agree, then save."""
        if self.stop_signal is None:
            self.stop_signal = signum
            self.console.print(f"received {signal.Signals(signum).name}: checkpointing after this step, then exiting")

    def stop_requested(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (one tiny all-reduce per step)."""
        if self.accelerator.num_processes == 1:
            return self.stop_signal is not None
        flag = torch.tensor([0 if self.stop_signal is None else 1], dtype=torch.int32)
        if self.flag_group is None:
            flag = flag.to(self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(flag.item())

    def preempt(self) -> dict[str, float]:
        path = self.save_checkpoint()
        self.console.print(
            f"stopped by a signal at step {self.step}: checkpoint saved to {path}; resume with train.resume=auto"
        )
        self.tracker.finish()
        self.accelerator.end_training()
        return {"preempted": True, "steps": self.step, "checkpoint": str(path)}

    # ---------------------------------------------------------------- logging
    def log_train(self) -> None:
        """Train scalars over the steps since the last log, averaged over all processes' examples."""
        acc = self.accelerator
        sums = acc.reduce(torch.cat([self.window, self.window.new_tensor([self.window_count])]), reduction="sum")
        values = (sums[:-1] / sums[-1]).tolist()  # the one host sync of the logging interval
        t_start, step_start = self.window_start
        steps = self.step - step_start
        record = {
            "split": "train",
            "epoch": self.epoch,
            "step": self.step,
            **dict(zip(TERMS, values)),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "fp16_skipped_steps": self.fp16_skipped,
            "examples_per_s": steps * self.cfg.train.batch_size / max(time.perf_counter() - t_start, 1e-9),
        }
        self.window.zero_()
        self.window_count = 0
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

    def summary(self, test: dict[str, float], elapsed: float, start_step: int) -> dict[str, float]:
        s = {
            "final_test_elbo": test.get("elbo", math.nan),
            "best_test_elbo": self.best_test_elbo,
            "steps": self.step,
            "seconds": elapsed,
            "examples_per_s": (self.step - start_step) * self.cfg.train.batch_size / max(elapsed, 1e-9),
        }
        self.console.table(
            "vae_dist run",
            [
                ("final test elbo", f"{s['final_test_elbo']:.2f} nats"),
                ("best test elbo", f"{s['best_test_elbo']:.2f} nats"),
                ("optimizer steps", str(self.step)),
                ("time", f"{elapsed:.1f} s"),
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
        """PNGs in run.dir (reconstructions, prior samples, latent space, loss curves), sent to the tracker."""
        if self.is_main:
            paths = write_figures(
                self.accelerator.unwrap_model(self.model),
                self.test_images,
                self.test_labels,
                self.metrics.read(),
                self.run_dir,
                seed=self.cfg.train.seed,
                steps_per_epoch=self.steps_per_epoch,
            )
            self.tracker.log_images({k: v for k, v in paths.items() if k != "loss"}, step=self.step)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """All ranks: agree on health, gather RNG states; the main process writes atomically."""
        acc = self.accelerator
        self.check_health()
        rng = {"rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["rng_cuda"] = torch.cuda.get_rng_state()
        # Per-rank state: RNG and this rank's part of the logging window, one row per rank.
        per_rank = {**rng, "window": self.window}
        per_rank = {k: acc.gather(v.to(acc.device)).reshape(acc.num_processes, -1).cpu() for k, v in per_rank.items()}
        path = checkpoints_dir(self.run_dir) / f"step-{self.step:08d}"
        if self.is_main:
            model = acc.unwrap_model(self.model)
            state = {
                "format": 1,
                "step": self.step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "best_test_elbo": None if math.isinf(self.best_test_elbo) else self.best_test_elbo,
                "fp16_skipped": self.fp16_skipped,
                "window_count": self.window_count,
                "window_start_step": self.window_start[1],
                "nonfinite_run": self.nonfinite_run,
                "num_processes": acc.num_processes,
                "tracker_run_id": self.tracker_run_id,
                "scheduler": self.scheduler.state_dict(),  # JSON-able: lr_lambdas of a function is None
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "config": self.cfg.to_dict(),
                "versions": {
                    "vae_dist": vae_dist.__version__,
                    "torch": torch.__version__,
                    "accelerate": accelerate.__version__,
                    "python": sys.version.split()[0],
                },
            }
            path = write_checkpoint(
                self.run_dir,
                self.step,
                model_state=model.state_dict(),
                model_config=model.config_dict,
                optimizer_state=self.optimizer.optimizer.state_dict(),
                trainer_tensors=per_rank,
                state=state,
                keep=self.cfg.checkpoint.keep,
            )
        acc.wait_for_everyone()
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
        self.optimizer.optimizer.load_state_dict(ckpt.optimizer)
        s = ckpt.state
        self.scheduler.load_state_dict(s["scheduler"])
        if acc.scaler is not None and s["scaler"]:
            acc.scaler.load_state_dict(s["scaler"])
        # Global RNG states are restored for same-topology resumes; no training draw uses them (all
        # noise is seeded by step), so a resume on another process count is exact too.
        # The logging window restarts empty on another topology (only the train scalars of that one
        # interval then cover fewer steps).
        rank = acc.process_index
        if ckpt.trainer["rng_cpu"].shape[0] == acc.num_processes:
            torch.set_rng_state(ckpt.trainer["rng_cpu"][rank].clone())
            if torch.cuda.is_available() and "rng_cuda" in ckpt.trainer:
                torch.cuda.set_rng_state(ckpt.trainer["rng_cuda"][rank].clone())
            self.window.copy_(ckpt.trainer["window"][rank].to(acc.device))
            self.window_count, self.window_start = s["window_count"], (time.perf_counter(), s["window_start_step"])
        else:
            self.window_start = (time.perf_counter(), s["step"])
        self.step, self.epoch, self.step_in_epoch = s["step"], s["epoch"], s["step_in_epoch"]
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
