"""The background checkpoint writer: `write_checkpoint` on a worker thread, while training goes on."""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vae_dist.checkpoint_files import PREFIX, CheckpointError, checkpoints_dir, write_checkpoint


def host_copy(tree: Any) -> Any:
    """A copy of `tree` (dicts, lists, tensors, plain values) whose tensors are private CPU copies:
    a snapshot that training may go on changing the originals of."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v) for v in tree)
    return copy.deepcopy(tree)


class CheckpointWriter:
    """`write_checkpoint` in the background, one checkpoint at a time (main process).

    `submit` snapshots the tensors into host memory and returns the checkpoint's path at once; one
    worker thread writes, fsyncs, renames and prunes while the next steps train, so a save costs the
    loop a device-to-host copy (a few MB), not a disk write. The next `submit` first waits for the
    previous write. A failed write raises its CheckpointError from the next `submit` or `wait`, or
    is returned by `failure`; a process that exits normally or by an exception still finishes the write in progress
    (the thread is joined at exit), and one killed outright leaves the previous checkpoint intact."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-checkpoint")
        self._pending: Future | None = None

    def submit(self, run_dir: Path, step: int, **parts: Any) -> Path:
        """Queue `write_checkpoint(run_dir, step, **parts)` on a snapshot of `parts`."""
        self.wait()
        snapshot = host_copy(parts)
        self._pending = self._pool.submit(write_checkpoint, run_dir, step, **snapshot)
        return checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}"

    def failure(self, wait: bool = True) -> BaseException | None:
        """The error of the last submitted write, or None when it succeeded (or none is pending);
        without `wait`, None while it is still running. Either way it is then no longer pending."""
        pending = self._pending
        if pending is None or not (wait or pending.done()):
            return None
        self._pending = None
        return pending.exception()

    def wait(self) -> None:
        """Return once the last submitted checkpoint is on disk; raise its CheckpointError."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the write in flight (a failure was reported by `failure`/`wait`, or the run is
        failing anyway: not raised again) and stop the thread."""
        try:
            self.wait()
        except CheckpointError:
            pass
        finally:
            self._pool.shutdown(wait=True)
