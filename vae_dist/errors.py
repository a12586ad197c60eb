"""The toolkit's errors: each one carries the exit code its program returns, so a program's `main`
catches one base class instead of a list of types. The message is the sentence a user reads."""

from __future__ import annotations

EXIT_FAILED = 1  # training stopped: non-finite loss, or a checkpoint or file could not be written
EXIT_BAD_INPUT = 2  # bad config, data, checkpoint or launch, or run.dir in use: nothing was trained
EXIT_PREEMPTED = 75  # a signal (SIGTERM, SIGINT, SIGUSR1) stopped it after a checkpoint: rerun the same command
EXIT_PEER_LOST = 76  # a process of a multi-process run stopped answering: rerun the same command on every machine


class VaeDistError(Exception):
    """A problem the toolkit explains in one sentence; `exit_code` is what a program returns for it."""

    exit_code = EXIT_FAILED


class BadInput(VaeDistError):
    """Something given to the program (config, data, a file, the launch) is wrong: nothing was done."""

    exit_code = EXIT_BAD_INPUT


def first_line(err: BaseException, limit: int = 300) -> str:
    """ "TypeName: the first line of its message", cut to `limit` characters: what a one-sentence report
    quotes of a library's multi-line error."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"
