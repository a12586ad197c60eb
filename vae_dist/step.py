"""One optimizer step of the VAE: the noise, forward, backward, the update and the
device-side sums; on CUDA, the whole of it captured once as a CUDA graph and replayed every step.

The trainer drives it: once an epoch, `TrainStep.epoch_batches(BatchPlan.epoch(e))` gathers this
process's pixels of the whole epoch into one float tensor [steps, accumulation steps, micro-batch,
784] on the device; then `TrainStep.run(step, batches[s])` takes optimizer step `step` on step s's
slice. Nothing in a step waits for the device: the loss sums and the finiteness of each step stay
in device tensors (the logging window's `rows`, vae_dist.window), read at its logging interval.

The batch plan (which examples each micro-batch takes): vae_dist.batches.

The noise contract: the reparameterisation noise (and, with data.binarize=dynamic, the Bernoulli
draws) of step s is drawn for the whole global batch from a generator seeded by (train.seed, s), and
each rank takes the rows of its examples (their positions in the batch plan). So an example's noise depends on
(seed, step, position in the global batch) only: 1 process x 100, 2 x 50 and 1 x 50 x 2 end with
the same parameters, and a resume is exact.

CUDA graphs (train.cuda_graphs): one `torch.cuda.CUDAGraph` holds every micro-batch's forward and
backward, DDP's gradient all-reduce, clipping, the fused Adam update (capturable, learning rate in a
device tensor so that schedules still apply) and the sums. Per step the host seeds the noise
generator, copies the step's pixels into the graph's input buffer and replays. The recipe, and the
pitfalls it avoids (PyTorch's "CUDA Graphs" notes; Megatron-LM's full_cuda_graph.py):
- eager warm-up steps on a side stream before capture: 3, or 11 under DDP (its first iterations
  rebuild buckets), and DDP itself built on a side stream (vae_dist.build.prepare);
- gradients allocated before capture and zeroed inside the graph, never set to None: a gradient
  that autograd creates inside the capture lives in the graph's private pool, and accumulation over
  micro-batches then read stale memory (pytorch/pytorch#96693);
- the noise generator registered with the graph (`register_generator_state`), so that a replay
  reads the seed and offset that `manual_seed` set on the host and advances the offset between
  draws as eager code does: the same numbers (`manual_seed` resets the offset to 0, so the
  multiple-of-4 rule of `set_offset` never bites);
- the optimizer's state created by the warm-up steps, not inside the capture (its zero
  initialisation would rerun at every replay), and loaded from a checkpoint before the capture
  (`load_state_dict` replaces the state tensors);
- every autocast region opens and closes inside the capture, so the weight casts it caches are
  made and dropped within the graph (the cache_enabled=False rule of `make_graphed_callables` is
  for graphs that end inside an autocast region);
- the first graphed step is checked against an eager step from the same state; a difference above
  `VERIFY_RTOL`, or any error while capturing, restores the state, warns once (`GraphWarning`,
  naming why) and trains on eagerly. Every rank agrees on the outcome.
A capture that fails inside `torch.cuda.graph(...)` leaves the noise generator marked as capturing
and may leave the capture stream current; both are undone (`_after_failed_capture`) before the
eager steps go on with the numbers of train.cuda_graphs=off. The graph is freed before the process
group at the end of a run (`release_graph`, vae_dist.run).
fp16 steps stay eager (docs/performance.md, "On a GPU"): with fused Adam, `GradScaler` no longer reads
its inf check on the host (the kernel skips the update itself, and the skip is counted on the
device in `skipped`), so nothing in principle keeps fp16 from a capture, but that capture has not
run on a GPU yet.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
import torch.distributed as dist
from accelerate.utils import get_mixed_precision_context_manager

from vae_dist.batches import BatchPlan
from vae_dist.build import side_stream
from vae_dist.data import to_unit
from vae_dist.errors import first_line
from vae_dist.losses import loss_terms
from vae_dist.streams import TERMS, TRAIN_STREAM, seed_for

WARMUP_STEPS = 3  # eager steps before capture (PyTorch's whole-network example uses 3)
WARMUP_STEPS_DDP = 11  # under DDP: "at least 11 DDP-enabled eager iterations" (PyTorch CUDA Graphs notes)
VERIFY_RTOL = 1e-5  # graph vs eager after the first graphed step: largest |a - b| / |b| (tensor norms)
MIN_NCCL = (2, 9, 6)  # NCCL that can be captured (PyTorch CUDA Graphs notes)


class GraphWarning(UserWarning):
    """The step could not be captured as a CUDA graph (the message says why); training goes on eagerly."""


class TrainStep:
    """One optimizer step, eager or replayed as one CUDA graph (see the module docstring).

    Each step writes its summed loss terms into the next row of the logging window's `rows`
    (vae_dist.window, which owns them); `norm` holds the global gradient norm before clipping (when
    optim.grad_clip > 0; otherwise `grad_norm()` measures it from the gradients the step left)."""

    def __init__(self, cfg, accelerator, model, optimizer, images: torch.Tensor, plan: BatchPlan, graphs: bool, window):
        self.acc = accelerator
        self.model = model  # as prepared: DDP-wrapped on several processes
        self.optimizer = optimizer  # Accelerate's wrapper: GradScaler step for fp16
        self.inner = optimizer.optimizer  # the torch optimizer itself
        self.params = [p for g in self.inner.param_groups for p in g["params"]]
        self.images = images  # uint8 [N, 784] on the device
        self.plan = plan
        self.seed = cfg.train.seed
        self.objective, self.k, self.z_dim = cfg.model.objective, cfg.model.k, cfg.model.z_dim
        self.estimator = cfg.model.estimator
        self.dynamic = cfg.data.binarize == "dynamic"
        self.clip = cfg.optim.grad_clip
        # Accelerate's autocast context (torch.autocast, or nothing in fp32), built once and re-entered
        # every micro-batch: `accelerator.autocast()` rebuilds it each call.
        self.autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        dev = accelerator.device
        self.noise = torch.Generator(device=dev)
        self.window = window  # vae_dist.window.LogWindow: the rows this step fills
        self.norm = torch.full((), math.nan, device=dev)
        self.skipped = torch.zeros((), dtype=torch.long, device=dev)  # fp16 steps skipped for inf/NaN gradients
        self.lr = math.nan  # the learning rate last set (host float)
        # KL warm-up (model.kl_warmup_steps): the weight of the KL in the loss, a device tensor the host
        # fills before each step (`set_kl_weight`) and a graph reads at replay, like the lr. None without
        # warm-up: the weight is 1 and the loss has no multiply.
        self.kl_weight = torch.ones((), device=dev) if cfg.model.kl_warmup_steps > 0 else None
        self.kl_weight_value = 1.0  # the weight last set (host float)
        # Graph state: capture is attempted after `warmup` eager steps from the start (or a resume).
        self.graphs = graphs
        self.warmup = WARMUP_STEPS_DDP if accelerator.num_processes > 1 else WARMUP_STEPS
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None  # the graph's input: one step's pixels
        self.fallback: str | None = None  # why the step runs eagerly although graphs were asked for

    # ---------------------------------------------------------------- the step
    def epoch_batches(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's pixels of an epoch, [steps, accum, micro, 784] for the indices `order` [steps,
        accum, micro] (BatchPlan.epoch): one gather an epoch, so a step takes a slice. On CUDA they
        are converted to float32 here too (188 MB of device memory for MNIST, no conversion kernel in
        the step); a CPU converts each micro-batch instead, since converting the whole epoch at once
        costs it ~0.1 s (page faults of 188 MB) against ~12 ms over 600 steps."""
        pixels = torch.index_select(self.images, 0, order.flatten()).view(*order.shape, -1)
        return to_unit(pixels) if pixels.is_cuda else pixels

    def compute(self, x: torch.Tensor) -> None:
        """The whole optimizer step on this rank's pixels [accum, micro, 784] (uint8, or float in
        [0, 1]): what one graph captures."""
        acc, plan = self.acc, self.plan
        eps = plan.this_rank(torch.randn(plan.batch_size, self.k, self.z_dim, generator=self.noise, device=acc.device))
        if self.dynamic:
            u = plan.this_rank(torch.rand(plan.batch_size, x.shape[-1], generator=self.noise, device=acc.device))
        # Gradients persist across graphed steps (zeroed here, inside the graph); eagerly they are
        # dropped and re-created by the first backward, which skips a memset of every gradient.
        self.inner.zero_grad(set_to_none=not self.graphs)
        total = None
        for m in range(plan.accum):
            xm = x[m] if x.is_floating_point() else to_unit(x[m])
            if self.dynamic:
                xm = (u[m] < xm).float()
            # DDP all-reduces after the last micro-batch only.
            with acc.no_sync(self.model) if m < plan.accum - 1 else contextlib.nullcontext():
                with self.autocast:
                    terms = loss_terms(self.model, xm, eps[m], self.objective, self.estimator, self.kl_weight)
                acc.backward(terms["loss"].mean())  # divides by the accumulation steps
            sums = torch.stack([terms[t].detach() for t in TERMS], 1).sum(0)
            total = sums if total is None else total + sums
        if self.clip > 0:
            self.norm.copy_(acc.clip_grad_norm_(self.params, self.clip))
        if acc.scaler is not None:
            before = acc.scaler._scale.clone()  # created by the first backward's scale()
            self.optimizer.step()  # GradScaler: unscale, skip on inf/NaN, update the scale
            # GradScaler halves its scale exactly when it found inf/NaN gradients and the update was
            # skipped: counted here on the device. Fused Adam skips inside its kernel
            # (`_step_supports_amp_scaling`), so Accelerate's `optimizer_step_was_skipped` never sees it.
            self.skipped.add_((acc.scaler._scale < before).long())
        else:
            self.inner.step()  # the wrapper only forwards here, at ~0.3 ms of host work a step on a CPU
        window = self.window
        if self.graphs:  # a replay finds its row through a device counter
            window.rows.index_copy_(0, window.row, total.unsqueeze(0))
            window.row.add_(1)
        else:  # eagerly the host knows it (fewer kernels a step: the CPU's hot path)
            window.rows[window.used].copy_(total)
        window.used += 1

    def run(self, step: int, x: torch.Tensor) -> None:
        """Optimizer step `step` (0-based count of steps taken) on the pixels `x`: replayed, or eager."""
        self.noise.manual_seed(seed_for(self.seed, TRAIN_STREAM, step))
        if self.graph is not None:
            self.static_x.copy_(x)
            self.graph.replay()
            self.window.used += 1
            return
        if self.graphs and self.fallback is None and self.eager_steps >= self.warmup and self.capture(step, x):
            return
        with side_stream() if self.graphs and self.fallback is None else contextlib.nullcontext():
            self.compute(x)
        self.eager_steps += 1

    # ---------------------------------------------------------------- what the trainer reads and sets
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps: written into the device tensor a graph reads, or the float."""
        if lr == self.lr:
            return
        self.lr = lr
        for group in self.inner.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def set_kl_weight(self, weight: float) -> None:
        """The KL weight of the next steps (model.kl_warmup_steps), written into the device tensor that
        the loss (and a captured graph) reads; nothing to do without warm-up."""
        if self.kl_weight is None or weight == self.kl_weight_value:
            return
        self.kl_weight_value = weight
        self.kl_weight.fill_(weight)

    def describe(self) -> str:
        """How the steps run: "one CUDA graph", or "eager" (and why, when graphs were asked for)."""
        if self.graph is not None:
            return "one CUDA graph a step"
        return f"eager: {self.fallback}" if self.fallback else "eager"

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm (before clipping) of the last step, on the device."""
        if self.clip > 0:
            return self.norm
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return self.norm
        # The gradients the step left: all-reduced (DDP) and unscaled (fp16), never clipped here.
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one foreach kernel
        if total_norm is not None:
            return total_norm(grads)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def release_graph(self) -> None:
        """Free the captured graph, and with it the all-reduce DDP captured, before the process group
        goes (vae_dist.run): NCCL cannot destroy a communicator a live graph holds."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.static_x = None, None

    # ---------------------------------------------------------------- checkpoint contents
    def state_dict(self) -> dict:
        """The fp16 grad scaler and the skipped-step count (the optimizer: `optimizer_state`)."""
        scaler = self.acc.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else None, "fp16_skipped": int(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if self.acc.scaler is not None and state["scaler"]:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.skipped.fill_(state["fp16_skipped"])

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with JSON-able param groups (a graph's lr is a device tensor)."""
        state = self.inner.state_dict()
        state["param_groups"] = [
            {k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in state["param_groups"]
        ]
        return state

    def load_optimizer(self, state: dict) -> None:
        """Load an optimizer state dict, keeping this run's lr (a device tensor on CUDA) and capturable flag."""
        keep = [{"lr": g["lr"], "capturable": g.get("capturable", False)} for g in self.inner.param_groups]
        self.inner.load_state_dict(state)
        for group, kept in zip(self.inner.param_groups, keep):
            group.update(kept)
        self.lr = math.nan  # the trainer sets it again before the next step

    # ---------------------------------------------------------------- capture
    def blocker(self) -> str | None:
        """Why this torch, launch or process group cannot capture the step; None when it can."""
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):  # pytorch/pytorch#114068
            return f"torch {torch.__version__} has no CUDAGraph.register_generator_state, which graph-safe noise needs"
        if self.acc.num_processes > 1:
            version = torch.cuda.nccl.version()
            if tuple(version) < MIN_NCCL:
                return f"NCCL {'.'.join(map(str, version))} cannot be captured (needs >= 2.9.6)"
            if os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0") != "0":
                return (
                    f"TORCH_NCCL_ASYNC_ERROR_HANDLING={os.environ['TORCH_NCCL_ASYNC_ERROR_HANDLING']} "
                    "(capturing NCCL needs 0)"
                )
        return None

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step writes: parameters, optimizer state, lr tensors and the device sums."""
        out = list(self.params)
        for p in self.params:
            out += [v for v in self.inner.state.get(p, {}).values() if torch.is_tensor(v)]
        out += [g["lr"] for g in self.inner.param_groups if torch.is_tensor(g["lr"])]
        return out + [self.window.rows, self.window.row, self.norm, self.skipped]

    def capture(self, step: int, x: torch.Tensor) -> bool:
        """Capture the step, replay it as step `step` and check it against the eager step from the same
        state. True: step `step` is done and later steps replay. False: nothing changed (warned), and
        the noise is seeded for step `step` again, so the eager step that follows draws what it should.

        Every rank agrees twice: that all captured (before any replay, since a replay runs the captured
        all-reduce, which a rank that gave up would never join), and that all replays verified."""
        state = self._state()
        before, used = [t.clone() for t in state], self.window.used
        graph, expected = None, None
        stream = torch.cuda.current_stream()
        why = self.blocker()
        if why is None:
            try:
                self.compute(x)  # the reference: one eager step (the noise is seeded already)
                expected = [t.clone() for t in state]
                for t, b in zip(state, before):
                    t.copy_(b)
                self.static_x = x.clone()
                graph = torch.cuda.CUDAGraph()
                with warnings.catch_warnings():  # torch >= 2.13 registers lazily and calls this deprecated
                    warnings.simplefilter("ignore")
                    graph.register_generator_state(self.noise)
                # Capturable Adam only inside the capture: torch warns that an eager capturable step
                # is slower, and fused Adam's arithmetic does not depend on the flag.
                self._capturable(True)
                # thread_local, as Megatron-LM and torchtitan capture: the tracker's and checkpoint
                # writer's threads may call into CUDA meanwhile without invalidating the capture.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.compute(self.static_x)
            except Exception as err:  # anything capture raises: the run trains on eagerly
                why = f"capture failed ({first_line(err, 200)})"
                self._after_failed_capture(stream)
            finally:
                self._capturable(False)
        why = self._agree(why)
        if why is None:
            why = self._agree(self._first_replay(graph, step, state, expected))
        self.window.used = used  # compute() counted the eager reference and the capture
        if why is None:
            self.graph = graph
            self.window.used += 1  # the replay of step `step`
            return True
        for t, b in zip(state, before):
            t.copy_(b)
        self.noise.manual_seed(seed_for(self.seed, TRAIN_STREAM, step))  # the eager step draws step's noise
        self.fallback, self.graph, self.static_x = why, None, None
        if self.acc.is_main_process:
            warnings.warn(
                f"train.cuda_graphs: the optimizer step is not replayed as a CUDA graph: {why}. Training goes "
                "on eagerly (same numbers, slower); set train.cuda_graphs=off to skip the attempt.",
                GraphWarning,
                stacklevel=3,
            )
        return False

    def _first_replay(self, graph, step: int, state: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
        """Replay the new graph as step `step`: why it cannot be used (an error, or a result other than
        the eager step's `expected`), or None."""
        try:
            self.noise.manual_seed(seed_for(self.seed, TRAIN_STREAM, step))
            graph.replay()
            diff = max(_relative(t, e) for t, e in zip(state, expected))
        except Exception as err:
            return f"the first replay failed ({first_line(err, 200)})"
        if not diff <= VERIFY_RTOL:
            return f"the first graphed step differed from the eager step by {diff:.1e} (relative, > {VERIFY_RTOL:g})"
        return None

    def _capturable(self, on: bool) -> None:
        for group in self.inner.param_groups:
            group["capturable"] = on

    def _after_failed_capture(self, stream) -> None:
        """What a capture that failed inside `torch.cuda.graph(...)` leaves behind, undone. In torch
        2.11 `capture_begin` marks the registered generator as capturing and only a successful
        `capture_end` clears the mark, so the next eager draw from it would raise: the noise comes
        from a fresh generator (seeded per step as ever). And `torch.cuda.graph.__exit__` restores the
        stream only after `capture_end`, which raises for an invalidated capture: the stream that was
        current before is made current again. (The default CUDA generator may stay marked too; no
        step, evaluation or figure draws from it.)"""
        torch.cuda.set_stream(stream)
        self.noise = torch.Generator(device=self.acc.device)

    def _agree(self, why: str | None) -> str | None:
        """Every rank replays, or none: one rank's failure is everyone's (its reason, or a note)."""
        if self.acc.num_processes == 1:
            return why
        failed = torch.tensor([0 if why is None else 1], device=self.acc.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and why is None:
            return "another process could not capture its step"
        return why


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor (0 when equal); NaN where both are NaN counts as equal."""
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else math.inf
    a, b = a.double(), b.double()
    both = a.isnan() & b.isnan()
    diff = torch.linalg.vector_norm(torch.where(both, 0.0, a - b)).item()
    scale = torch.linalg.vector_norm(torch.where(both, 0.0, b)).item()
    if math.isnan(diff):
        return math.inf
    return diff / scale if scale > 0 else diff
