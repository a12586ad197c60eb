"""The launch checks and the CPU thread rule every command applies (vae_dist/processes.py).
Run: pytest tests/test_processes.py"""

from __future__ import annotations

import pytest
import torch

from vae_dist.processes import LaunchError, check_launch, set_cpu_threads, usable_cores


def test_check_launch_refuses_a_process_left_alone(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    check_launch(1)  # a plain single process
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_launch(4)
    with pytest.raises(LaunchError, match="WORLD_SIZE=4 but only one process joined"):
        check_launch(1)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(LaunchError, match="--multi_gpu --num_processes N"):
        check_launch(1)


def test_cpu_threads_share_the_usable_cores(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    set_cpu_threads(None, 1)
    assert torch.get_num_threads() == usable_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * usable_cores()))
    set_cpu_threads(None, 1)
    assert torch.get_num_threads() == 1  # more processes than cores: one thread each
    set_cpu_threads(3, 1)
    assert torch.get_num_threads() == 3


def test_oversubscribed_cores_are_one_warning_line_not_a_refusal(monkeypatch, capsys) -> None:
    import vae_dist.processes as processes

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(processes, "usable_cores", lambda: 2)
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "busy_elsewhere", lambda: 0)
    assert processes.oversubscribed(2) is None  # alone on the machine
    assert "3 torch threads on 2 usable cores" in processes.oversubscribed(3)
    monkeypatch.setattr(processes, "busy_elsewhere", lambda: 2)  # another run's two threads are busy
    assert "2 threads of other processes are running" in processes.oversubscribed(2)
    assert processes.oversubscribed(2, local_processes=2) is not None
    monkeypatch.setattr(processes, "busy_elsewhere", lambda: 1)  # the sibling of a 2-process launch
    assert processes.oversubscribed(1, local_processes=2) is None

    problem = set_cpu_threads(2, 1)  # the command goes on, and says why once its work starts
    assert torch.get_num_threads() == 2 and "1 thread of other processes is running" in problem
    monkeypatch.setenv("LOCAL_RANK", "1")  # one line per machine, from local rank 0
    assert set_cpu_threads(2, 1) is None


def test_the_crowded_cores_warning_names_the_option_of_the_running_command(monkeypatch) -> None:
    """vae-train: train.cpu_threads; vae-evaluate: --cpu-threads; a seed of vae-seeds (which sets the
    threads itself): --parallel."""
    import vae_dist.processes as processes

    monkeypatch.delenv(processes.UNDER_SEEDS, raising=False)
    monkeypatch.setattr(processes, "usable_cores", lambda: 2)
    monkeypatch.setattr(processes.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "busy_elsewhere", lambda: 2)
    assert "give each run its share with train.cpu_threads" in processes.oversubscribed(2)
    evaluate = processes.oversubscribed(2, 1, "--cpu-threads")
    assert "give each its share with --cpu-threads" in evaluate and "train.cpu_threads" not in evaluate
    assert "lower --cpu-threads" in processes.oversubscribed(3, 1, "--cpu-threads")
    monkeypatch.setenv(processes.UNDER_SEEDS, "1")
    seed = processes.oversubscribed(1, 2)
    assert "vae-seeds --parallel" in seed and "train.cpu_threads" not in seed
    assert "vae-seeds --parallel" in processes.oversubscribed(3)


def test_busy_elsewhere_reads_the_running_threads() -> None:
    from vae_dist.processes import busy_elsewhere

    busy = busy_elsewhere(samples=2, interval_s=0.0)
    assert busy is None or busy >= 0


def test_a_crowded_machine_is_one_line_when_training_starts(tiny_overrides, monkeypatch, capsys) -> None:
    """vae-train says it once its run starts, on stdout with the run's other lines; a run refused at
    start-up (tests/test_signals.py: run.dir in use) says only why it was refused."""
    import vae_dist.processes as processes
    from conftest import train_in_process

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(processes, "busy_elsewhere", lambda: 4)  # four threads of other runs are busy
    train_in_process([*tiny_overrides, "train.max_steps=2", "train.cpu_threads=1"])
    out, err = capsys.readouterr()
    assert out.count("warning: ") == 1 and "4 threads of other processes are running" in out
    assert "warning" not in err
