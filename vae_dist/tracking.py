"""Where metrics go: always `<run.dir>/metrics.jsonl`, plus an experiment tracker behind a tiny interface.

`Tracker` is the no-op default and the base class; trackers are created on the main process only.
A tracker failure never stops training: `SafeTracker` turns exceptions into one warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class Tracker:
    """No-op tracker: the signature every real tracker implements."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def log_model(self, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class MetricsFile:
    """Appends one JSON object per line to metrics.jsonl (split, epoch, step, elbo, recon, kl, ...)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step`: a resumed run replays those steps and logs them again."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
