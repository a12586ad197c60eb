"""A W&B service that a launcher's tree-kill cannot reach, so a stopped run's W&B record is whole.

Why: `accelerate launch` >= 1.16 answers SIGTERM by sending SIGTERM to every descendant of its
training process at once, then SIGKILL 5 s later. W&B's service (`wandb-core`, which writes the
run's `.wandb` file and uploads it) is a child of the training process, so it died at the same
moment as the signal, before the training process had checkpointed and finished its W&B run: the
offline run file stopped at its last full 32 KiB block, and a resumed run cannot log those steps
again (it skips the steps W&B already had when the run stopped).

What: W&B's documented way to share one service between processes is the WANDB_SERVICE variable
that `wandb.setup()` sets. `python -m vae_dist.wandb_service` forks once and lets its first
process exit, so the service keeper is re-parented away from the training process (a launcher's
`children(recursive=True)` no longer finds it) and sits in its own session; it calls
`wandb.setup()`, prints the token, and waits on its stdin. The training process keeps the other end
of that pipe: when the training process ends, however it ends (kill -9 included), the keeper reads
EOF, calls `wandb.teardown()` (W&B writes and uploads everything it received) and exits.

`shield()` starts the keeper and points this process's `wandb` at it; any failure leaves W&B to
start its own service, as before, with one warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

TOKEN_TIMEOUT_S = 60.0  # importing wandb and starting wandb-core: seconds, more on a loaded machine
_keeper: subprocess.Popen | None = None  # holds the keeper's stdin open for this process's lifetime


def shield() -> bool:
    """Use a W&B service outside this process's tree; True when WANDB_SERVICE now points at one.
    Idempotent; a service already named by WANDB_SERVICE (a parent's) is kept as it is."""
    global _keeper
    if os.environ.get("WANDB_SERVICE"):
        return True
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vae_dist.wandb_service"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its only reader may be a launcher that died: no SIGPIPE
            text=True,
            close_fds=True,
        )
        token = _read_token(proc)
    except (OSError, TimeoutError, RuntimeError) as err:
        from vae_dist.tracking import TrackingWarning

        warnings.warn(
            f"the W&B service runs inside this process's tree ({err}): a launcher that kills the whole "
            "tree on SIGTERM may cut the W&B run short; metrics.jsonl keeps every record.",
            TrackingWarning,
            stacklevel=2,
        )
        return False
    _keeper = proc
    os.environ["WANDB_SERVICE"] = token
    return True


def _read_token(proc: subprocess.Popen) -> str:
    """The keeper's first stdout line; its first process exits at once (the fork), so reap it too."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(TOKEN_TIMEOUT_S):
            raise TimeoutError(f"no W&B service token within {TOKEN_TIMEOUT_S:.0f} s")
    token = proc.stdout.readline().strip()
    proc.wait(timeout=TOKEN_TIMEOUT_S)  # the forking parent, long gone: no zombie left behind
    if not token:
        raise RuntimeError("the W&B service keeper exited without a token")
    return token


def main() -> None:
    if os.fork() > 0:  # the first process exits: the keeper below is nobody's descendant any more
        os._exit(0)
    os.setsid()  # and no terminal's Ctrl-C (the foreground process group) reaches it
    # wandb-core inherits fds 1 and 2: point them at /dev/null, so it never writes to a pipe whose
    # reader (the training process, a launcher) has died, which would end it with SIGPIPE mid-write.
    token_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import wandb

    wandb.setup()
    token = os.environ.get("WANDB_SERVICE", "")
    print(token, file=token_out, flush=True)
    token_out.close()
    if not token:
        return
    try:
        sys.stdin.read()  # EOF: the training process ended, however it ended
    except KeyboardInterrupt:
        pass
    started, outcome = time.monotonic(), "ok"
    try:
        wandb.teardown()  # finishes what the training process left open and writes every record it sent
    except BaseException as err:  # wandb exits with its service's code when a client died mid-run
        outcome = f"{type(err).__name__} {err}"
        raise
    finally:
        if os.environ.get("VAE_DIST_WANDB_SERVICE_LOG"):  # tests and measurements: how the teardown went
            with open(os.environ["VAE_DIST_WANDB_SERVICE_LOG"], "a") as log:
                log.write(f"teardown {time.monotonic() - started:.3f} s: {outcome}\n")


if __name__ == "__main__":
    main()
