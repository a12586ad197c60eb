"""Reading a W&B run back from its local files, without wandb's service or a network: what the
tests check and what a resumed run asks (the last step an earlier segment logged).

A run segment is a folder `<run.dir>/wandb/[offline-]run-<time>-<id>` holding `run-<id>.wandb`, a
transaction log of protobuf records (wandb.proto's `Record`) in LevelDB's log format.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WANDB_BLOCK = 32 * 1024  # the .wandb transaction log uses LevelDB's log format: 32 KiB blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    """Raw records of a run-<id>.wandb file (a 7-byte ':W&B' header, then LevelDB log records).
    A truncated tail (a killed process) ends the iteration."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (no ':W&B' header)")
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = WANDB_BLOCK - pos % WANDB_BLOCK
        if room < 7:  # block trailer: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 or len(body) < length:
            break
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            parts = body
        elif kind == _MIDDLE:
            parts += body
        elif kind == _LAST:
            yield parts + body


def read_wandb_run(path: Path) -> dict[str, Any]:
    """What a local W&B run folder (offline-run-* or run-*) holds: {"history": [row, ...], "config": {...},
    "artifacts": [name, ...], "run_id": str, "name": str, "group": str, "exited": bool}. Rows map metric names to values, with
    `_step`. `exited` is False until wandb has written the run's exit record (it writes asynchronously)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    out: dict[str, Any] = {
        "history": [],
        "config": {},
        "artifacts": [],
        "run_id": None,
        "name": None,
        "group": None,
        "exited": False,
    }
    for f in files:
        for raw in _wandb_records(f):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                out["history"].append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "run":
                out["run_id"] = record.run.run_id
                out["name"] = record.run.display_name or None
                out["group"] = record.run.run_group or None
                for item in record.run.config.update:
                    out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "artifact":
                out["artifacts"].append(record.artifact.name)
            elif kind == "exit":
                out["exited"] = True
    return out


def local_runs(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """The W&B run folders under <run.dir>/wandb (of `run_id` only, if given), oldest first."""
    folders = []
    for p in (Path(run_dir) / "wandb").glob("*run-*"):
        # offline-run-YYYYMMDD_HHMMSS-<id>, with "-1", "-2", ... when a segment starts in the same second
        m = re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-(.+?)(?:-(\d+))?", p.name)
        logs = list(p.glob("run-*.wandb")) if m and p.is_dir() and not p.is_symlink() else []
        if logs and (run_id is None or logs[0].name == f"run-{run_id}.wandb"):
            folders.append((m.group(1), int(m.group(3) or 0), p))
    return [p for *_, p in sorted(folders)]


def last_logged_step(run_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The highest step an earlier segment of run `run_id` wrote under <run.dir>/wandb; -1 if none."""
    last = -1
    for folder in local_runs(run_dir, run_id):
        if exclude is not None and folder.resolve() == Path(exclude).resolve():
            continue
        try:
            steps = [row["_step"] for row in read_wandb_run(folder)["history"] if "_step" in row]
        except Exception:  # an unreadable log: nothing to skip rather than no tracking
            continue
        last = max([last, *steps])
    return last
