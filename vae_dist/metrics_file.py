"""`<run.dir>/metrics.jsonl`: one JSON object per line, the record of a run that needs no tracker.

Written by the main process (vae_dist.report), read back by a resumed run, the figures and the results
tables. A line torn by a killed process is dropped on reading; any other damage is an error that
names the line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsFile:
    """Appends one JSON object per line to metrics.jsonl (split, epoch, step, elbo, recon, kl, ...)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return self.read_checked()[0]

    def read_checked(self) -> tuple[list[dict[str, Any]], str | None]:
        """The records, and the torn last line that was dropped (None when there was none).

        A process killed in the middle of `write` leaves a last line without its end; it is dropped
        (a resumed run logs that step again). Any other line that is not JSON (or not text) raises
        ValueError naming the file and the line."""
        if not self.path.exists():
            return [], None
        lines = self.path.read_bytes().splitlines()
        records, torn = [], None
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                records.append(record)
            except (UnicodeDecodeError, ValueError) as err:
                if number < len(lines):
                    why = getattr(err, "msg", None) or (
                        "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err
                    )
                    raise ValueError(f"{self.path} line {number} is not JSON ({why}): the file is damaged.") from None
                torn = raw.decode("utf-8", "replace")
        return records, torn

    def terminated(self) -> bool:
        """Whether the file ends with a newline (or is empty, or absent): the next record starts a line of its own."""
        if not self.path.exists():
            return True
        with self.path.open("rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def sync(self) -> None:
        """On disk, not only in the page cache: a checkpoint written after this never covers records a
        crash of the machine could take back."""
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def replayed(record: dict[str, Any], step: int, epochs: int | None = None) -> bool:
        """Whether a run resumed at `step` with `epochs` completed epochs logs `record` again: a record
        of a later step, or the test record of an epoch the checkpoint did not complete (a checkpoint
        taken at an epoch's last step, before its evaluation)."""
        later = record.get("step", 0) > step
        unclosed = epochs is not None and record.get("split") == "test" and (record.get("epoch") or 0) > epochs
        return later or unclosed

    def truncate_after(self, step: int, epochs: int | None = None) -> None:
        """Drop the records a run resumed at `step` (with `epochs` completed) logs again (`replayed`)."""
        kept = [r for r in self.read() if not self.replayed(r, step, epochs)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
