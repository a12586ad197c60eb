"""The training loop: Accelerate around the VAE/ELBO core.

Distributed, precision and rank concerns are settled in `Trainer.__init__`; `fit` reads like the
algorithm: for each epoch, for each global batch, take an optimizer step; evaluate; save.

Noise and determinism: every random draw of a training step (the reparameterisation noise eps and,
with data.binarize=dynamic, the Bernoulli pixels) is drawn for the *whole global batch* from a
generator seeded by (train.seed, optimizer step), and each process takes the slice of the examples
it holds. So an example gets the same noise whether it lands on rank 0 or 3, in micro-batch 0 or 1:
the process count, micro-batch size and accumulation steps change speed, never the result.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration

from vae_dist.config import Config, ConfigError
from vae_dist.console import Console
from vae_dist.data import Split, index_loader, load_data, to_unit
from vae_dist.evaluate import TERMS, evaluate_elbo, seed_for
from vae_dist.model import VAE, loss_terms
from vae_dist.tracking import MetricsFile, Tracker

TRAIN_STREAM = 1  # noise stream id of training steps; evaluation uses EVAL_STREAM


def build_state(cfg: Config) -> PartialState:
    """The process group. On a machine without CUDA, `cpu=True` gives a gloo group under
    `accelerate launch --multi_gpu`; a launcher that asked for N processes but reached one is refused."""
    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes == 1:
        raise RuntimeError(
            f"the launcher set WORLD_SIZE={world} but only one process joined the group, so {world} "
            "independent copies would train and overwrite each other's files. On a CPU machine launch "
            "with `accelerate launch --multi_gpu --num_processes N` (not --cpu)."
        )
    if state.device.type == "cpu":
        # `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core
        # machine's speed; share the usable cores between this machine's processes instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes if state.num_processes > 1 else 1))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, cores // local))
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
        fused = acc.device.type == "cuda"
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            fused=fused,
            foreach=None if fused else True,
        )
        loader = index_loader(len(train), self.micro)
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        if cfg.train.compile:
            self.model = torch.compile(self.model)

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
        self.step_in_epoch = 0
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self.tracker = Tracker()
        self._reset_window()

    # ---------------------------------------------------------------- the algorithm
    def fit(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        self.prepare_run_dir()
        self.console.start(cfg.train.epochs, self.steps_per_epoch, self.epoch, self.step_in_epoch)
        t0, start_step = time.perf_counter(), self.step
        best = math.inf
        test = {}
        while self.epoch < cfg.train.epochs and not self.finished():
            self.console.new_epoch(self.epoch, self.steps_per_epoch)
            self.console.advance_steps(self.step_in_epoch)
            for micro, idx in enumerate(self.epoch_batches()):
                self.train_step(idx, micro % self.accum)
                if acc.sync_gradients:
                    self.step += 1
                    self.step_in_epoch += 1
                    self.scheduler.step()
                    if self.step % cfg.tracking.log_every_steps == 0:
                        self.log_train()
                    if self.finished():
                        break
            if self.step_in_epoch == self.steps_per_epoch:  # a whole epoch, not a max_steps stop
                self.epoch += 1
                self.step_in_epoch = 0
            test = self.evaluate()
            best = min(best, test["elbo"])
            self.log_test(test)
        self.console.stop()
        elapsed = time.perf_counter() - t0
        self.export_model()
        summary = {
            "final_test_elbo": test.get("elbo", math.nan),
            "best_test_elbo": best,
            "steps": self.step,
            "seconds": elapsed,
            "examples_per_s": (self.step - start_step) * cfg.train.batch_size / max(elapsed, 1e-9),
        }
        self.console.table(
            "vae_dist run",
            [
                ("final test elbo", f"{summary['final_test_elbo']:.2f} nats"),
                ("best test elbo", f"{best:.2f} nats"),
                ("optimizer steps", str(self.step)),
                ("time", f"{elapsed:.1f} s"),
                ("throughput", f"{summary['examples_per_s']:.0f} examples/s"),
                ("run directory", str(self.run_dir)),
            ],
        )
        acc.end_training()
        return summary

    def finished(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def epoch_batches(self):
        """This process's micro-batches of example indices for the current epoch, from the resume point."""
        self.loader.set_epoch(self.epoch)  # order = permutation seeded by train.seed + epoch
        skip = self.step_in_epoch * self.accum
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def train_step(self, idx: torch.Tensor, micro: int) -> None:
        """One micro-batch: forward, backward; on the last micro-batch of a step, clip and update."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            x, eps = self.batch(idx, micro)
            with acc.autocast():
                terms = loss_terms(self.model, x, eps, self.cfg.model.objective)
            acc.backward(terms["loss"].mean())  # backward() divides by the accumulation steps
            if acc.sync_gradients and self.cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Summed on the device; read only at the logging interval (no host sync per step).
        self.window += torch.stack([terms[t].detach().sum() for t in TERMS])
        self.window_count += x.shape[0]

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

    # ---------------------------------------------------------------- logging
    def _reset_window(self) -> None:
        self.window = torch.zeros(len(TERMS), device=self.accelerator.device)
        self.window_count = 0
        self.window_start = (time.perf_counter(), self.step)

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
            "examples_per_s": steps * self.cfg.train.batch_size / max(time.perf_counter() - t_start, 1e-9),
        }
        self._reset_window()
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

    # ---------------------------------------------------------------- files
    def prepare_run_dir(self) -> None:
        """Create run.dir and save the resolved config there (main process; others wait)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        self.accelerator.wait_for_everyone()

    def export_model(self) -> Path:
        """model.safetensors + config.json in run.dir, loadable with VAE.from_pretrained(run.dir)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            acc.unwrap_model(self.model).save_pretrained(self.run_dir)
        acc.wait_for_everyone()
        return self.run_dir / "model.safetensors"
