"""One run per run.dir at a time: an exclusive kernel lock on `<run.dir>/.lock`.

Without it, two runs started into the same run.dir (two shells, a job submitted twice) both exit 0
with metrics.jsonl interleaved and their checkpoints mixed. The main process takes the lock before
it writes anything into run.dir and holds it for the run's lifetime:

    with RunLock(run_dir):
        ...  # train; a second run into run_dir raises RunLocked, naming this one

The lock is `flock(LOCK_EX | LOCK_NB)` on `.lock`. Once it is held, the file is rewritten with who
holds it (JSON: host, pid, started, slurm_job_id, argv), so a refused run can say whom to wait for.
A refused run writes nothing. The kernel drops a flock when its holder dies (kill -9 included), so a
lock left by a dead run never blocks the next one, and no stale-lock cleanup is needed.

Where it holds:

- Local disks (ext4, xfs, tmpfs, ...): always, between processes of one machine.
- NFS: Linux clients since 2.6.12 emulate flock() with POSIX byte-range locks on the whole file, so
  it works across clients when the server supports locking (NFSv4, or NFSv3 with lockd). A mount
  with `local_lock=flock` or `local_lock=all` keeps the lock on one client. A client that crashes
  or loses the network keeps its lock until its lease expires on the server (typically 90 s); the
  same Slurm job, requeued within that time, replaces the stale lock (see below), any other run is
  refused until then.
- Lustre: only when the client mounts it with `-o flock` (coherent across all clients).
  `localflock` locks within one node only, so two runs on two nodes are not detected; `noflock`
  makes flock() fail with ENOSYS, and the run goes on unlocked with a RunLockWarning. Check with
  `grep lustre /proc/mounts`.

Where flock() is not supported at all (ENOLCK, ENOSYS, EOPNOTSUPP) the run is not refused: it warns
once that concurrent runs into this run.dir cannot be detected there, and goes on without the lock.

Sources: flock(2) (https://man7.org/linux/man-pages/man2/flock.2.html: locks belong to an open file
description and are released when all its descriptors are closed; "NFS details"); nfs(5)
`local_lock`; RFC 7530 section 9.5 (NFSv4 leases let a server drop a crashed client's locks; 90 s
is the Linux nfsd default lease); Lustre client README and mount.lustre(8) (`flock`, `localflock`,
`noflock` -> ENOSYS); Python's fcntl docs (failures raise OSError since 3.3).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from vae_dist.errors import BadInput

LOCK_NAME = ".lock"

# flock() errors that mean "this filesystem cannot lock", not "someone holds the lock":
# ENOLCK (NFS without a lock manager, flock(2)), ENOSYS (Lustre mounted `noflock`), EOPNOTSUPP
# (equal to ENOTSUP on Linux; other filesystems and FUSE mounts without lock support).
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# flock(LOCK_NB) on a held lock fails with EWOULDBLOCK (== EAGAIN on Linux; Python raises
# BlockingIOError for it).
HELD = {errno.EWOULDBLOCK, errno.EAGAIN}


class RunLocked(BadInput, RuntimeError):
    """Another live run holds the run.dir; the message names it and says what to do."""

    def __init__(self, run_dir: Path, holder: dict[str, Any] | None):
        self.run_dir = run_dir
        self.holder = holder or {}
        if self.holder.get("pid") == os.getpid() and self.holder.get("host") == socket.gethostname():
            # A notebook or test that built a second Trainer while the first is still alive.
            message = (
                f"run.dir={run_dir} is held by another Trainer of this same process (pid {os.getpid()}); "
                "let its fit() finish, call its release(), or choose another run.dir."
            )
        else:
            message = (
                f"run.dir={run_dir} is in use by {describe(self.holder)}; wait for it to finish, "
                f"{how_to_stop(self.holder)}, or choose another run.dir."
            )
        super().__init__(message)


class RunLockWarning(UserWarning):
    """The lock could not protect this run.dir (unsupported filesystem) or replaced a stale one."""


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host node01 (Slurm job 456) since 2024-05-01 12:00:00 CEST', or a fallback."""
    if not holder.get("pid"):
        # The holder has locked the file but not written it yet (microseconds), or the file was
        # written by something else.
        return "another process (its .lock file does not say which)"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        text += f" (Slurm job {holder['slurm_job_id']})"
    if holder.get("started"):
        text += f" since {local_time(holder['started'])}"
    return text


def how_to_stop(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "stop it (`fuser -v <run.dir>/.lock` lists it)"
    return f"stop it with `kill -TERM {holder['pid']}` on {holder.get('host', 'its host')}"


def local_time(iso: str) -> str:
    """An ISO time (as written by another host, with its offset) in this machine's local time."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    except (TypeError, ValueError):
        return str(iso)


def holder_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "argv": sys.argv,
    }


def read_holder(fd: int) -> dict[str, Any] | None:
    """What the lock file says about its holder, or None when it says nothing readable.

    Reading without the lock is fine: flock is advisory. The holder writes right after locking, so
    an empty file gets a few short retries before giving up.
    """
    for attempt in range(5):
        try:
            data = os.pread(fd, 65536, 0)
            if data.strip():
                info = json.loads(data)
                return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            pass
        if attempt < 4:
            time.sleep(0.02)
    return None


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (it may have been replaced meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


class RunLock:
    """An exclusive lock on `<run_dir>/.lock` for the lifetime of one run.

    Take it on the main process only (the other ranks write nothing into run.dir). acquire() creates
    run_dir and the empty .lock file when absent, and raises RunLocked when another live run holds
    it; release() (or leaving the `with` block) lets the next run in. `locked` says whether the
    kernel lock is held: False after an unsupported-filesystem warning.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.locked = False
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Lock run.dir; True when the kernel lock is held, False when the filesystem cannot lock."""
        if self._fd is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        holder = None
        for _ in range(3):  # a retry only follows a replaced file; 3 bounds a pathological race
            # O_RDWR|O_CREAT without O_TRUNC: a refused run must not erase the holder's record.
            # O_CLOEXEC (Python's default, PEP 446) keeps the fd out of exec'd children; forked ones
            # (data-loader workers) share the lock until they exit, which is what we want.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in UNSUPPORTED:
                    os.close(fd)
                    warnings.warn(
                        f"the filesystem of run.dir={self.run_dir} does not support file locks "
                        f"(flock: {err.strerror or err}), so a second run into this run.dir cannot be "
                        "detected there; make sure only one run uses it (on Lustre, mount with -o flock).",
                        RunLockWarning,
                        stacklevel=2,
                    )
                    return False
                if err.errno not in HELD:
                    os.close(fd)
                    raise
                holder = read_holder(fd)
                os.close(fd)
                if not self._same_job(holder):
                    raise RunLocked(self.run_dir, holder) from None
                # Lost node on a shared filesystem: this same Slurm job ran before its requeue on a
                # node that died, and the server keeps that node's lock until its lease expires
                # (~90 s on NFSv4). Slurm runs one instance of a job at a time, so the holder is
                # dead: replace the file. unlink + create gives a new inode the old lock does not
                # cover (on a local disk this also "wins" against a live holder; see the tests).
                warnings.warn(
                    f"run.dir={self.run_dir}: replacing the lock of {describe(holder)}, an earlier "
                    "start of this same Slurm job (requeued), which cannot still be running.",
                    RunLockWarning,
                    stacklevel=2,
                )
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            if not same_file(fd, self.path):
                # Between our open and flock, a requeued run replaced the file: our lock is on an
                # orphaned inode. Start over on the new one.
                os.close(fd)
                continue
            self._fd = fd
            self.locked = True
            self._write_holder()
            return True
        raise RunLocked(self.run_dir, holder)

    def release(self) -> None:
        """Unlock and close; the file stays (removing it would race with a run waiting to open it)."""
        if self._fd is None:
            return
        fd, self._fd, self.locked = self._fd, None, False
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a Trainer dropped without finishing (tests, notebooks) frees its run.dir
        self.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _same_job(self, holder: dict[str, Any] | None) -> bool:
        """The holder is an earlier start of this Slurm job: same job id, another restart count (two
        steps of one job start, `srun ... & srun ...`, share the count and are refused)."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job or holder is None or str(holder.get("slurm_job_id")) != job:
            return False
        return str(holder.get("slurm_restart_count", "")) != os.environ.get("SLURM_RESTART_COUNT", "0")

    def _write_holder(self) -> None:
        """Record who holds the lock; only ever called with the lock held."""
        assert self._fd is not None
        data = (json.dumps(holder_info(), indent=1) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)  # so that a refused run on another NFS client reads it
