"""A run of several processes ends within `dist.timeout_s` when one of them stops answering.

A node that dies, or a network that splits, leaves the other processes waiting in a collective: on
gloo for the process group's timeout (torch's default: 30 minutes), on NCCL with
TORCH_NCCL_ASYNC_ERROR_HANDLING=0 (which a graphed DDP step needs, see vae_dist.run) for ever, since
no watchdog then aborts a kernel that waits on a dead peer. So every process beats a heartbeat on a
gloo group of its own, from a thread of its own: a tiny all-reduce every few seconds, on the CPU,
independent of what the training thread or the GPU is blocked in. When a peer's connection closes
(its process died) or the heartbeat waits `dist.timeout_s` (a partition), the process prints one
sentence and exits EXIT_PEER_LOST at once. Nothing can be saved then (a checkpoint needs every
rank); the newest checkpoint on disk is whole, since checkpoints are written to a temporary folder
and renamed, and the same command resumes from it.

The heartbeat also carries the end: a process that ends its run says so in its next beat, and every
process stops beating after that same beat, so no healthy run's end looks like a lost peer.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vae_dist.errors import EXIT_PEER_LOST

# Set by vae_dist.cli.machines (the launcher of a multi-machine run): the file a process writes its
# message to before it exits EXIT_PEER_LOST, so that the launcher, whose torchrun agent may itself be
# blocked on the lost network, can end with the same code.
PEER_LOST_FILE_ENV = "VAE_DIST_PEER_LOST_FILE"
BEAT_EVERY_S = 5.0  # seconds between heartbeats (at most a quarter of dist.timeout_s)


def lost_peer_message(run_dir: Path, timeout_s: float, cause: str) -> str:
    return (
        f"vae-train: error: a process of this run on another machine (or this one) stopped answering "
        f"({cause}): its node died, or the network between the nodes failed, and no process can go on "
        f"without it (dist.timeout_s={timeout_s:g}). Rerun the same command on every machine to resume "
        f"from the newest checkpoint in {run_dir / 'checkpoints'}."
    )


def gloo_cause(err: Exception) -> str:
    """gloo's error in a few words: "Connection closed by peer [10.0.0.2]:1187", without its source
    location and advice."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:561] "
    return text.split(". ")[0].rstrip(".")


class PeerWatch:
    """The heartbeat of one process of a multi-process run (see the module docstring)."""

    def __init__(self, run_dir: Path, timeout_s: float):
        self.run_dir = run_dir
        self.timeout_s = timeout_s
        # Collective: every rank builds it at the same point (after the stop-flag group, vae_dist.run).
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.interval = min(BEAT_EVERY_S, timeout_s / 4)
        self._ending = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vae_dist-peer-watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        flag = torch.zeros(1, dtype=torch.int32)
        while True:
            self._ending.wait(self.interval)
            flag.fill_(int(self._ending.is_set()))
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            except Exception as err:  # gloo: "Connection closed by peer", "Timed out waiting ..."
                self._lost(err)
            if flag.item():  # some process is ending its run: every one stops after this beat
                return

    def _lost(self, err: Exception) -> None:
        message = lost_peer_message(self.run_dir, self.timeout_s, gloo_cause(err))
        print(message, file=sys.__stderr__, flush=True)
        if note := os.environ.get(PEER_LOST_FILE_ENV):
            try:
                Path(note).write_text(message + "\n")
            except OSError:
                pass  # the launcher then ends the way torchrun does
        # At once, from this thread: the training thread may be blocked in a collective (or on a GPU
        # kernel) that never returns. What a normal end would release is released by the OS; the W&B
        # run is closed by its own service (vae_dist.wandb_service).
        os._exit(EXIT_PEER_LOST)

    def stop(self) -> None:
        """The run ends: beat once more saying so and stop (every process stops with that beat). A
        peer that is gone shows here too, and ends this process with EXIT_PEER_LOST."""
        self._ending.set()
        self._thread.join(self.timeout_s + self.interval + 5.0)
        # Its gloo threads joined here, in order: a gloo group freed only at interpreter shutdown can
        # abort a finished process (see vae_dist/train.py).
        dist.destroy_process_group(self.group)
        self.group = None
