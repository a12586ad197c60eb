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
