"""A command whose reader goes away (`vae-results runs/ | head`) ends quietly, not with a traceback.

Python raises BrokenPipeError at the first write after the reader closed the pipe, and again when it
flushes stdout at exit. The commands that print results wear `@quiet_when_the_reader_leaves`: the
error ends the command with exit code 141 (128 + SIGPIPE, what a shell reports for tools the signal
ends), and stdout is pointed at /dev/null so the flush at exit has nowhere to fail. Not vae-train: a
training run keeps training when its log reader dies (docs/checkpoints.md, "Stopping a run").
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

EXIT_PIPE_CLOSED = 141


def quiet_when_the_reader_leaves(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # inside the try: a reader gone during the last lines is the same case
            return code
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_PIPE_CLOSED

    return wrapper
