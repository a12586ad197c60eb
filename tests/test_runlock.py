"""One run per run.dir (vae_dist/runlock.py), checked with real processes holding real locks.
Run: .venv/bin/python -m pytest -q tests/test_runlock.py

The holder is a separate Python process started with `sys.executable -c`; the contender is the test
process itself (a second process as far as the kernel is concerned), so RunLocked is caught directly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vae_dist.runlock import RunLock, RunLocked, RunLockWarning

REPO = Path(__file__).resolve().parent.parent

# Takes the lock, says so, and holds it until its stdin closes (or it is killed).
HOLD = """
import sys
from vae_dist.runlock import RunLock
lock = RunLock(sys.argv[1])  # held while referenced: a dropped RunLock releases itself
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""

# Holds a bare flock on .lock without recording a holder (a holder caught between lock and write).
HOLD_SILENT = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch) -> None:
    """Tests run outside Slurm unless they say otherwise (the same-job rule keys on SLURM_JOB_ID)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


@pytest.fixture
def hold():
    """hold(run_dir, slurm_job_id=None) -> a live process that holds the run.dir lock."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path, slurm_job_id: str | None = None, code: str = HOLD) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if slurm_job_id:
            env["SLURM_JOB_ID"] = slurm_job_id
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(run_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked", "the holder process did not get the lock"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def holder_record(run_dir: Path) -> dict:
    return json.loads((run_dir / ".lock").read_text())


def test_second_run_is_refused_and_writes_nothing(tmp_path, hold) -> None:
    run_dir = tmp_path / "run"
    proc = hold(run_dir)
    lock_file = run_dir / ".lock"
    before, stat_before = lock_file.read_bytes(), lock_file.stat()
    assert holder_record(run_dir)["pid"] == proc.pid

    with pytest.raises(RunLocked) as refused:
        RunLock(run_dir).acquire()
    message = str(refused.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert f"`kill -TERM {proc.pid}` on {socket.gethostname()}" in message
    assert "choose another run.dir" in message and "Slurm" not in message
    assert refused.value.holder["pid"] == proc.pid
    # Not one byte, not even the modification time, changed by the refused attempt.
    assert lock_file.read_bytes() == before
    assert lock_file.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert proc.poll() is None


def test_a_killed_holder_never_blocks(tmp_path, hold) -> None:
    run_dir = tmp_path / "run"
    proc = hold(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RunLock(run_dir)
    assert lock.acquire() is True  # at once: the kernel dropped the dead process's lock
    assert holder_record(run_dir)["pid"] == os.getpid()
    lock.release()


def test_a_requeued_slurm_job_replaces_the_lock_others_are_refused(tmp_path, hold, monkeypatch) -> None:
    # Stands in for a requeued job whose earlier start lost its node: on NFS the dead client's lock
    # lingers until its lease expires. Here the holder is alive, and unlink + create still wins,
    # because the new process locks the new inode.
    run_dir = tmp_path / "run"
    proc = hold(run_dir, slurm_job_id="4242")
    old_inode = (run_dir / ".lock").stat().st_ino

    monkeypatch.setenv("SLURM_JOB_ID", "9999")
    with pytest.raises(RunLocked, match=rf"pid {proc.pid} on host .* \(Slurm job 4242\) since \d{{4}}-\d\d-\d\d"):
        RunLock(run_dir).acquire()

    # The same job and the same start (two steps of one job, `srun ... & srun ...`): refused too.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(RunLocked, match=rf"pid {proc.pid} on host"):
        RunLock(run_dir).acquire()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job, requeued
    lock = RunLock(run_dir)
    with pytest.warns(RunLockWarning, match=rf"replacing the lock of pid {proc.pid} .*Slurm job 4242"):
        assert lock.acquire() is True
    record = holder_record(run_dir)
    assert (record["pid"], record["slurm_job_id"]) == (os.getpid(), "4242")
    assert (run_dir / ".lock").stat().st_ino != old_inode
    assert proc.poll() is None  # the old holder was not touched, only its file replaced
    lock.release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, code) -> None:
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = RunLock(tmp_path / "run")
    with pytest.warns(RunLockWarning, match="cannot be detected there"):
        assert lock.acquire() is False
    assert lock.locked is False
    assert (tmp_path / "run" / ".lock").read_bytes() == b""  # unlocked, so nothing written
    lock.release()  # a no-op


def test_other_flock_errors_are_raised(tmp_path, monkeypatch) -> None:
    def flock(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError, match="Input/output error"):
        RunLock(tmp_path / "run").acquire()


def test_release_then_acquire_again(tmp_path) -> None:
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    assert lock.acquire() is True and lock.locked
    # A second lock in the same process is refused too: flock locks belong to the open file
    # description, and each RunLock opens its own.
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(run_dir).acquire()
    lock.release()
    assert not lock.locked and (run_dir / ".lock").exists()  # the file stays
    assert lock.acquire() is True
    lock.release()
    with RunLock(run_dir) as again:
        assert again.locked
    assert not again.locked


def test_unrecorded_holder_is_still_refused(tmp_path, hold) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hold(run_dir, code=HOLD_SILENT)
    with pytest.raises(RunLocked, match="another process .*does not say which.*choose another run.dir"):
        RunLock(run_dir).acquire()
