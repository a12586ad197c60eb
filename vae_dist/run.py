"""A run's frame: its process group, its run.dir, its stop signals, and the one place where it ends.

`Run` begins a run (the process group on the device `train.device` names, the run.dir lock) and ends
it. Each resource is registered with the run's `contextlib.ExitStack` as it is built (`Run.hold`), and
every way out of a run (finished, preempted, failed, refused during start-up) goes through `Run.end`,
which unwinds the stack: the reverse of the build order, which `Trainer.setup` keeps to

    device work -> the captured step -> the checkpoint writer -> the figure worker -> the tracker
      -> the process group -> the signal handlers -> run.dir's lock

The process group goes last of the shared things because NCCL cannot destroy a communicator while
a live CUDA graph holds one of its collectives: `ncclCommDestroy` waits for the graph to be freed
(pytorch/pytorch#115388, vllm-project/vllm#39846), and with TORCH_NCCL_ASYNC_ERROR_HANDLING=0 (which
a graphed DDP run needs) no watchdog breaks that wait. A stage that fails is a warning; the stages
after it still run, so one broken piece never leaves the others (a worker process, a lock) behind.
A stage that hangs is cut short: after END_GRACE_S the process prints every thread's traceback and
exits 1 (its checkpoints and export are on disk by then). The figure worker dies with the training
process whatever kills it (vae_dist.figures), and so does a launcher's training process with its
launcher (vae_dist.signals).

Stop signals: `Run.should_stop(step)` is asked after every optimizer step. On one process it reads a
Python attribute. On several, the ranks agree through a gloo all-reduce of their flags that is
started every `STOP_CHECK_EVERY` steps without waiting and read at the next such step: no host
waits for another inside the loop, and a signal reaches every rank within 2 * STOP_CHECK_EVERY
optimizer steps. At the end of an epoch they agree at once (`stop_agreed`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState

from vae_dist.build import wants_graphs
from vae_dist.config import Config, ConfigError
from vae_dist.peers import PeerWatch
from vae_dist.processes import check_launch, describe_processor, set_cpu_threads
from vae_dist.runlock import RunLock, RunLocked
from vae_dist.signals import StopSignals
from vae_dist.tracking import log_with

STOP_CHECK_EVERY = 10  # optimizer steps between the ranks' stop-flag all-reduces (several processes)
# Seconds the end of a run may take (an online W&B upload waits up to 120 s) before the process
# prints every thread's traceback and exits 1, instead of hanging until a scheduler kills it.
END_GRACE_S = 300.0


class ReleaseWarning(RuntimeWarning):
    """Something a run held could not be released at its end; the rest was released."""


def build_state(cfg: Config) -> tuple[PartialState, str | None]:
    """The process group on the device train.device names, and why the CPU's cores are oversubscribed
    (None when they are not, or on a GPU). On a machine without CUDA (or with train.device=cpu),
    `cpu=True` gives a gloo group under `accelerate launch --multi_gpu`; a launcher that asked for N
    processes but reached one is refused."""
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
    # dist.timeout_s bounds every collective (gloo's own default is 30 minutes); see vae_dist.peers.
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.dist.timeout_s))
    check_launch(state.num_processes)
    oversubscribed = None
    if state.device.type == "cpu":
        if cfg.train.cuda_graphs == "on":
            raise ConfigError(
                "train.cuda_graphs=on but this run trains on the CPU; use train.cuda_graphs=auto or off, "
                "or run where torch sees a GPU."
            )
        oversubscribed = set_cpu_threads(cfg.train.cpu_threads, state.num_processes)
        # After ~700 steps, Adam's first moment of weights that almost never get a gradient (MNIST's
        # black border pixels, dead ReLU units) decays into float32's subnormal range, where every x86
        # operation on it is many times slower: a CPU run loses ~40% of its speed for no accuracy.
        # Worker threads copy this mode from the main thread when they start, so it is set before
        # the first parallel operation of `vae-train`.
        torch.set_flush_denormal(cfg.train.flush_denormal)
    return state, oversubscribed


# The files a run writes at the top of run.dir, and what each holds.
RUN_FILES = {
    ".lock": "its lock",
    "config.yaml": "the run's config",
    "metrics.jsonl": "the run's records",
    "runtime.json": "the run's environment",
}


def check_run_files(run_dir: Path) -> None:
    """A ConfigError when one of RUN_FILES is there but is not a file (a folder in its place): the
    run would stop, or fail to resume, at the first write, so it is refused before anything is written."""
    for name, what in RUN_FILES.items():
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise ConfigError(
                f"{path} is not a file (a folder?), where vae-train keeps {what}; move it aside "
                f"(mv {path} {path}.aside) and rerun, or choose a new run.dir."
            )


def lock_run_dir(run_dir: Path) -> RunLock:
    """Hold run.dir for this run (main process): refused while another live run holds it, and a
    ConfigError when the folder cannot be written, before anything is written into it."""
    check_run_files(run_dir)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError as err:
        raise ConfigError(
            f"run.dir={run_dir} cannot be written ({err.strerror or err}); choose a folder you can write to."
        ) from err
    return lock


class Run:
    """run.dir and its lock, the stop signals and the ranks' agreement on them, and the ordered end."""

    def __init__(self, cfg: Config, signals: StopSignals | None = None):
        """The process group and the Accelerator over it; run.dir locked (main process; refused on every
        rank when another run holds it) and cleared of the temporary folders of saves that were killed.
        `signals`: those `vae-train` installed at its start; without them (a notebook, a test) `start`
        installs its own for the run."""
        # What the run holds, each registered as it is built and released in reverse at its one end
        # (`end`): run.dir's lock last, the process group before it, then whatever the trainer adds.
        self.resources = contextlib.ExitStack()
        self.lock: RunLock | None = None
        self.peers: PeerWatch | None = None
        self._flag: tuple[torch.Tensor, dist.Work] | None = None  # the stop-flag all-reduce in flight
        self.resources.callback(self.release_lock)
        self.signals = signals or StopSignals()
        self.own_signals = False
        self.resources.callback(self.uninstall_own_signals)
        self.cfg, self.ended, self.is_main = cfg, False, False
        self.dir = Path(cfg.run.dir)
        self.new_dir = not self.dir.exists()
        try:
            self.start_up(cfg)
        except BaseException:  # refused (or stopped) during start-up: released as at any other end
            self.end()
            raise

    def start_up(self, cfg: Config) -> None:
        """The process group and the Accelerator; run.dir locked; the flag group and the heartbeat."""
        state, self.oversubscribed = build_state(cfg)  # a warning, said when training starts (Report.start)
        self.accum, self.micro = cfg.train.batch_split(state.num_processes)  # a ConfigError names the numbers to change
        self.accelerator = accelerator = Accelerator(
            cpu=state.device.type == "cpu",
            mixed_precision=cfg.train.precision,
            gradient_accumulation_steps=self.accum,
            log_with=log_with(cfg.tracking),
            # No AutocastKwargs: with one, every `accelerator.autocast()` rebuilds its kwargs inside
            # accelerate's clear_environment(), which empties and restores os.environ (about 0.3 ms a
            # step on the 2-core CPU, and racy with other threads).
        )
        self.hold("the process group", self.destroy_process_group)
        self.is_main = accelerator.is_main_process
        self.lock = self.on_main(lambda: lock_run_dir(self.dir))
        # The ranks agree on stop flags over a gloo group of their own: on NCCL no GPU stream waits for
        # it, and on gloo it never queues behind DDP's gradient all-reduces.
        several = accelerator.num_processes > 1
        timeout = timedelta(seconds=cfg.dist.timeout_s)
        self.flag_group = dist.new_group(backend="gloo", timeout=timeout) if several else None
        # From here a process that stops answering ends the run within dist.timeout_s (vae_dist.peers).
        self.peers = PeerWatch(self.dir, cfg.dist.timeout_s) if several else None
        self._agreed = False  # a stop every rank has agreed on

    def on_main(self, action: Callable, *errors: type[Exception]):
        """`action()` on the main process; the others get None. An error there (a refused run.dir, or
        one of `errors`) is raised on every rank (elsewhere as a ConfigError with its message), so that
        no rank waits in a collective for one that gave up."""
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except (ConfigError, RunLocked, *errors) as err:
                error = err
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([None if error is None else str(error)])[0]
            if message is not None and error is None:
                error = ConfigError(message)
        if error is not None:
            raise error
        return result

    # ---------------------------------------------------------------- start
    def start(self, on_signal: Callable[[int], None]) -> None:
        """Training begins: a signal is recorded from now on (not raised), and run.dir holds the
        resolved config."""
        if not self.signals.installed:  # vae-train installed them at its start; a notebook or test has not
            self.signals.install()
            self.own_signals = True
        self.signals.on_first = on_signal
        self.signals.defer()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(self.cfg.to_yaml())

    # ---------------------------------------------------------------- stop signals
    def should_stop(self, step: int) -> bool:
        """After optimizer step `step`: True on every rank once they agreed that one got a signal (one
        process: at once; several: within 2 * STOP_CHECK_EVERY steps of the signal, see the docstring)."""
        if self.flag_group is None:
            return self.signals.received is not None
        if self._agreed or step % STOP_CHECK_EVERY:
            return self._agreed
        self._settle()  # started STOP_CHECK_EVERY steps ago: long finished, no wait
        if not self._agreed:
            flag = torch.tensor([int(self.signals.received is not None)], dtype=torch.int32)
            self._flag = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.flag_group, async_op=True))
        return self._agreed

    def stop_agreed(self) -> bool:
        """Whether any rank got a signal, agreed now (blocking): at the end of an epoch."""
        if self.flag_group is None:
            return self.signals.received is not None
        if not self._agreed:
            self._agreed = self.any_rank(self.signals.received is not None)
        return self._agreed

    def any_rank(self, flag: bool) -> bool:
        """`flag` of any rank, on every rank (over the gloo flag group: no GPU stream sync)."""
        if self.flag_group is None:
            return flag
        self._settle()
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(t.item())

    def _settle(self) -> None:
        """Finish the stop-flag all-reduce in flight, so that the group's collectives keep one order
        on every rank (every rank has the same one in flight: all ask at the same steps)."""
        if self._flag is not None:
            flag, work = self._flag
            self._flag = None
            work.wait()
            self._agreed = self._agreed or bool(flag.item())

    # ---------------------------------------------------------------- end
    def hold(self, what: str, release: Callable[[], object]) -> None:
        """Register `release` of a resource just built: the run's end calls it before what was held
        earlier. A release that fails is a ReleaseWarning, and the ones after it still run."""

        def guarded() -> None:
            try:
                release()
            except Exception as err:  # a failed release never keeps the next ones from running
                warnings.warn(f"could not release {what} at the end of the run ({err})", ReleaseWarning, stacklevel=2)

        self.resources.callback(guarded)

    def end(self) -> None:
        """The one end of a run, on every path: what it holds, released in reverse of how it was built
        (`hold`). Called once; later calls do nothing."""
        if self.ended:
            return
        self.ended = True
        # A watchdog thread in C (faulthandler): it needs no GIL, so it fires even when a release
        # hangs inside a C call, e.g. a communicator destroy that waits on a graph (module docstring).
        # The process's own stderr (file descriptor 2): sys.stderr may be a Python object without one
        # (a notebook, pytest's capture).
        faulthandler.dump_traceback_later(END_GRACE_S, exit=True, file=sys.__stderr__)
        try:
            self.resources.close()
        finally:
            faulthandler.cancel_dump_traceback_later()

    def uninstall_own_signals(self) -> None:
        if self.own_signals:
            self.signals.uninstall()

    def release_lock(self) -> None:
        """run.dir's lock, last; a run refused at start-up leaves no empty run.dir behind."""
        if self.lock is not None:
            self.lock.release()
            if self.is_main and self.new_dir and [p.name for p in self.dir.iterdir()] == [".lock"]:
                shutil.rmtree(self.dir)

    def info(self, **extra) -> dict:
        """What the run trains on, for the console, the summary and the tracker's config."""
        acc = self.accelerator
        return {
            "num_processes": acc.num_processes,
            "precision": self.cfg.train.precision,
            **extra,
            "device": str(acc.device),
            "processor": describe_processor(acc.device),
        }

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA), before anything it uses is freed."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    def destroy_process_group(self) -> None:
        """The process group, last of the shared things (see the module docstring)."""
        self._flag = None
        if self.peers is not None:  # before the group it beats on goes
            self.peers.stop()
        self.accelerator.end_training()  # its trackers are finished already: this destroys the group
