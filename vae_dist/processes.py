"""What a launched process checks and takes before it works: the process count it was promised,
and its share of the machine's CPU cores. Used by `vae-train`, `vae-evaluate` and `vae-bench`."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from vae_dist.errors import BadInput


class LaunchError(BadInput, RuntimeError):
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


# vae-seeds sets this in each seed's environment: there the seeds' share is chosen by --parallel, and
# train.cpu_threads is set already, so the warning names the option the user can change.
UNDER_SEEDS = "VAE_DIST_UNDER_SEEDS"


def set_cpu_threads(threads: int | None, num_processes: int, option: str = "train.cpu_threads") -> str | None:
    """`threads` torch threads, or this machine's usable cores shared between its processes; returns
    why the cores are oversubscribed (`oversubscribed`) on local rank 0, else None. The command says
    it in one warning line once its work starts, so that a run refused at start (a bad input, a
    run.dir in use) still says only why.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core
    machine's speed. `option`: what the user sets the thread count with (vae-evaluate: --cpu-threads)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    threads = threads or max(1, usable_cores() // local)
    torch.set_num_threads(threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per machine, not one per process
        return oversubscribed(threads, local, option)
    return None


def busy_elsewhere(samples: int = 5, interval_s: float = 0.02) -> int | None:
    """Threads running right now in other processes of this machine, or None where /proc/loadavg is missing.

    The fourth field of /proc/loadavg counts the runnable threads at this instant (proc(5)); the
    smallest of a few samples, less the reader itself, keeps the busy threads of other runs and drops
    short blips. The load average itself would not do: it lags a minute, so the seed that starts
    right after another one ended would see that one's load."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i < samples - 1:
            time.sleep(interval_s)
    return max(0, min(counts) - 1)


def oversubscribed(threads: int, local_processes: int = 1, option: str = "train.cpu_threads") -> str | None:
    """Why `threads` torch threads in each of `local_processes` processes would oversubscribe this
    machine's cores, or None. Two 2-thread runs side by side on 2 cores ran 10-20x slower each, not
    2x (OpenMP threads spin while they wait for each other), so this is worth a line at the start."""
    cores, total = usable_cores(), os.cpu_count() or 1
    seeds = os.environ.get(UNDER_SEEDS) == "1"
    if threads * local_processes > cores:
        fix = "run fewer seeds at once (vae-seeds --parallel)" if seeds else f"lower {option}"
        return (
            f"{local_processes} x {threads} torch threads on {cores} usable cores: the threads oversubscribe the "
            f"cores and each runs many times slower; {fix} so that processes x threads <= cores."
        )
    busy = busy_elsewhere()
    # The other processes of this launch are starting too and may be among the running threads.
    others = None if busy is None else busy - (local_processes - 1)
    if others is not None and others > 0 and others + threads * local_processes > total:
        return (
            f"{others} thread{'s' if others != 1 else ''} of other processes {'are' if others != 1 else 'is'} running on this machine's {total} cores, and this run "
            f"takes {threads * local_processes} more, so the cores are oversubscribed and every run on them slows "
            f"down many times over; {share_advice(option, seeds)}"
        )
    return None


def share_advice(option: str, seeds: bool) -> str:
    """How to give the cores back, in the terms of the command that is running."""
    if seeds:
        return "run fewer seeds at once (vae-seeds --parallel), or the other work after the sweep."
    if option == "train.cpu_threads":
        return "give each run its share with train.cpu_threads (vae-seeds does), or run them one after another."
    return f"give each its share with {option}, or run them one after another."


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), e.g. 'Intel(R) Xeon(R) Processor'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_processor(device: str | torch.device) -> str:
    """The processor a run trains on, as a results table names it: the GPU's name, or the CPU's model
    with the torch threads this process uses and the cores it may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''} on {usable_cores()} cores"
