"""What a launched process checks and takes before it works: the process count it was promised,
and its share of the machine's CPU cores. Used by `vae-train`, `vae-evaluate` and `vae-bench`."""

from __future__ import annotations

import os

import torch


class LaunchError(RuntimeError):
    """The launcher asked for several processes but this one is alone: refuse rather than run N copies."""


def check_launch(num_processes: int) -> None:
    """Raise LaunchError when the launcher asked for N > 1 processes and this one is alone in its group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and num_processes == 1:
        raise LaunchError(
            f"the launcher set WORLD_SIZE={world} but only one process joined the group, so {world} "
            "independent copies would run and overwrite each other's files. On a CPU machine launch "
            "with `accelerate launch --multi_gpu --num_processes N` (not --cpu)."
        )
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and "MASTER_ADDR" in os.environ and num_processes == 1:
        # `accelerate launch --cpu --num_processes N` (N > 1) exports MASTER_ADDR for an MPI launcher
        # and then starts one plain process: the user asked for N and would silently get 1.
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` starts a single process without MPI. For N CPU "
            "processes in a gloo group use `accelerate launch --multi_gpu --num_processes N` (it uses the CPU "
            "when there is no GPU); for one process drop --num_processes."
        )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which taskset and Slurm narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_threads(threads: int | None, num_processes: int) -> None:
    """`threads` torch threads, or this machine's usable cores shared between its processes.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core
    machine's speed."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    torch.set_num_threads(threads or max(1, usable_cores() // local))
