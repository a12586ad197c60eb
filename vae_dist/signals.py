"""Stop signals, however a run was started: SIGTERM, SIGINT and SIGUSR1 stop a run with a checkpoint.

`vae-train` installs `StopSignals` before anything else, so no moment of a run is left to Python's
default action (which kills the process with no checkpoint):

- start-up (imports, devices, data, model, resume): nothing has trained since the last checkpoint,
  so the first signal raises `Stopped` at once and `vae-train` exits 75 having written nothing;
- from `Trainer.fit` on (`defer()`): a signal is only recorded. The loop finishes its optimizer
  step (or the epoch-end evaluation, pictures or checkpoint in progress), every rank agrees, a
  checkpoint is saved when a step ran since the last one, and the run exits 75. After the last
  optimizer step the run finishes its final evaluation, checkpoint and export (seconds) and exits 0.

A launcher killed by a supervisor: `accelerate launch` with one process exits at once on SIGTERM
and leaves its training process running, reparented, with nobody to stop it (torchrun's agent, with
several processes, forwards SIGTERM itself). So a process started by a launcher asks the kernel for
SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, Linux), and treats it like any stop signal;
and should it be hung where that signal's handler never runs, it exits ORPHAN_GRACE_S after its
parent died (`watch_parent`). A process started from a shell does not: `nohup vae-train ... &` must
outlive its shell.

This module imports nothing heavy: it is installed before torch is imported.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Environment variables a launcher sets in the processes it starts: accelerate's single-process
# launcher (ACCELERATE_USE_CPU, always) and torchrun (LOCAL_RANK, TORCHELASTIC_RUN_ID).
LAUNCHER_VARIABLES = ("ACCELERATE_USE_CPU", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
PARENT = os.getppid()  # read at import, before anything slow: the parent that started this process
# Seconds an orphaned launcher child may take to stop (finish its step, save, end the run) before it
# prints its threads' tracebacks and exits 1: a child hung where no signal handler runs never
# outlives its launcher by more.
ORPHAN_GRACE_S = 300.0


class Stopped(BaseException):
    """A stop signal during start-up. A BaseException, like KeyboardInterrupt, so that the
    `except Exception` of a download or a tracker on the way out does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Handlers for STOP_SIGNALS: raise `Stopped` until `defer()`, then record the first signal."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal, once one arrived
        self.deferred = False
        self.on_first: Callable[[int], None] | None = None  # called once, with the signal, when deferred
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopSignals:
        """Take over the stop signals (main thread only); under a launcher, also the parent's death."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        if any(v in os.environ for v in LAUNCHER_VARIABLES):
            die_with_parent()
            watch_parent()
        return self

    def defer(self) -> None:
        """From now on a signal is recorded for the training loop instead of raising."""
        self.deferred = True
        if self.received is not None and self.on_first is not None:
            self.on_first(self.received)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if not self.deferred:
            raise Stopped(signum)
        if first and self.on_first is not None:
            self.on_first(signum)


def watch_parent(interval_s: float = 1.0) -> threading.Thread:
    """A daemon thread that arms a deadline once this process's parent is gone: ORPHAN_GRACE_S later
    the process prints every thread's traceback and exits 1, unless it ended by itself. The parent's
    SIGTERM (die_with_parent) only runs its Python handler when the main thread returns to Python;
    the deadline is a C thread (faulthandler) that needs neither, so a hung child cannot stay behind."""

    def watch() -> None:
        while os.getppid() == PARENT:
            time.sleep(interval_s)
        faulthandler.dump_traceback_later(ORPHAN_GRACE_S, exit=True, file=sys.__stderr__)

    thread = threading.Thread(target=watch, name="vae-parent-watch", daemon=True)
    thread.start()
    return thread


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux); True when set.

    If the parent already died before the request (it is inherited by nobody), send it now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != PARENT:  # reparented between our start and the request: the parent is gone
        os.kill(os.getpid(), sig)
    return True
