"""Where metrics go: always `<run.dir>/metrics.jsonl`, plus Weights & Biases through Accelerate's trackers.

`Tracker` is the no-op default and the base class; `WandbTracker` is the real one, created on the
main process only by `start_tracker`. The trainer builds its Accelerator with
`log_with=log_with(cfg.tracking)` and calls `start_tracker` once the run directory exists.

A tracker problem never stops or slows training: any exception inside W&B becomes one
`TrackingWarning`, the tracker turns into a no-op and detaches itself from the Accelerator (so
`end_training` does not trip over it), and metrics.jsonl and the PNG figures are written as before.

Modes (`tracking.mode`): `online` syncs while training; `offline` writes the run under
`<run.dir>/wandb/offline-run-*` for a later `wandb sync`; `off` writes nothing to W&B; `auto`
(the default) is online when W&B credentials exist (WANDB_API_KEY, or a W&B host in ~/.netrc
from `wandb login`), else offline, so a first run never asks for a login. `online` that cannot
reach the server within PROBE_TIMEOUT_S (or has no credentials) warns once and runs offline.
"""

from __future__ import annotations

import configparser
import functools
import json
import math
import netrc
import os
import re
import socket
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from vae_dist.signals import LAUNCHER_VARIABLES
from vae_dist.wandb_service import shield

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vae_dist.config import Config, TrackingConfig

Mode = Literal["online", "offline", "off"]
PROBE_TIMEOUT_S = 3.0  # seconds to reach the W&B host before an online run falls back to offline
INIT_TIMEOUT_S = 30.0  # wandb.init limit (wandb's own default is 90 s); online, once the host answered the probe
FINISH_TIMEOUT_S = 120.0  # upload wait at the end of an online run; what is left stays on disk for `wandb sync`
# Hosts a `wandb login` writes to ~/.netrc: the classic API and the CoreWeave Forge default of wandb >= 0.31.
WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# Values of the WANDB_MODE environment variable, as `tracking.mode=auto` reads them.
ENV_MODES: dict[str, Mode] = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "off",
}


class TrackingWarning(UserWarning):
    """W&B could not do something; training goes on (metrics.jsonl and the PNGs are still written)."""


class Tracker:
    """No-op tracker: the signature every real tracker implements."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int, drawn_at: int | None = None) -> None:
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


# ------------------------------------------------------------------ which mode
def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path("~").expanduser()
    return home / ".netrc" if (home / ".netrc").exists() or not (home / "_netrc").exists() else home / "_netrc"


def _settings_base_url() -> str | None:
    """base_url saved by `wandb login --host` in the W&B settings file, if any."""
    folder = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    parser = configparser.ConfigParser()
    try:
        parser.read(folder / "settings")
        return parser.get("default", "base_url", fallback=None)
    except configparser.Error:
        return None


def base_url() -> str:
    """The W&B server a run talks to: WANDB_BASE_URL, else `wandb login --host`, else the public API."""
    return os.environ.get("WANDB_BASE_URL") or _settings_base_url() or DEFAULT_BASE_URL


def has_wandb_credentials() -> bool:
    """True when WANDB_API_KEY (or an identity token file) is set, or ~/.netrc has an entry for a W&B host.

    Only the presence of an entry is checked; the key itself is never read into a message."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = {urlsplit(u).hostname for u in (os.environ.get("WANDB_BASE_URL"), _settings_base_url()) if u}
    try:
        machines = netrc.netrc(_netrc_path()).hosts
    except (OSError, netrc.NetrcParseError):  # no file, unreadable, or malformed: no credentials
        return False
    return any(h in machines for h in hosts | set(WANDB_HOSTS))


def resolve_mode(cfg: TrackingConfig) -> Mode:
    """online | offline | off. `auto`: the WANDB_MODE environment variable if set (offline, disabled,
    online), else online with W&B credentials and offline without."""
    if cfg.mode != "auto":
        return cfg.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ENV_MODES:
        return ENV_MODES[env]
    return "online" if has_wandb_credentials() else "offline"


def log_with(cfg: TrackingConfig) -> str | None:
    """What to pass as `Accelerator(log_with=...)`: "wandb", or None when tracking is off."""
    return None if resolve_mode(cfg) == "off" else "wandb"


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s host cannot be reached within `timeout` seconds (DNS + TCP connect), or None if it can.

    With an HTTPS proxy in the environment the proxy is probed instead. Runs in a daemon thread,
    because a hung DNS lookup ignores socket timeouts."""
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None
    )
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return f"{url!r} has no host name"
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"{host}:{port}: {err.strerror or type(err).__name__}")

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:g} s"


# ------------------------------------------------------------------ starting a run
def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a result, for the run's config."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("vae_dist", "torch", "torchvision", "accelerate", "wandb", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _redact(text: str) -> str:
    """A message as it may be shown: any API key (the environment's, or anything key-shaped) masked."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "***")
    return re.sub(r"\b[A-Za-z0-9_-]{40,}\b", "***", text)


def _first_line(err: BaseException) -> str:
    return _redact(f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}")


def _warn(message: str) -> None:
    warnings.warn(message, TrackingWarning, stacklevel=3)


def _detach(accelerator: Accelerator) -> None:
    """Forget Accelerate's W&B tracker, so `end_training` neither finishes it twice nor trips over a broken one."""
    accelerator.trackers[:] = [t for t in accelerator.trackers if getattr(t, "name", None) != "wandb"]


def _quiet_by_default() -> bool:
    """W&B runs quiet unless the user chose with WANDB_QUIET or WANDB_SILENT."""
    return "WANDB_QUIET" not in os.environ and "WANDB_SILENT" not in os.environ


def _settings(mode: Mode):
    import wandb

    values: dict[str, Any] = {}
    if "WANDB_INIT_TIMEOUT" not in os.environ:  # offline too: a wedged wandb service would block for 90 s
        values["init_timeout"] = INIT_TIMEOUT_S
    if mode == "online":
        values["finish_timeout"] = FINISH_TIMEOUT_S
    if _quiet_by_default():
        # W&B ends a run with ~30 lines of history sparklines and summary that push the run's own
        # summary off the screen; quiet keeps its run and URL lines (WandbTracker.finish then names
        # the offline folder and the upload command in one line).
        values["quiet"] = True
    fields = getattr(wandb.Settings, "model_fields", None)  # pydantic Settings: wandb >= 0.18
    if fields is not None:
        values = {k: v for k, v in values.items() if k in fields}
    return wandb.Settings(**values)


def start_tracker(
    cfg: Config,
    accelerator: Accelerator,
    run_dir: Path,
    run_id: str | None = None,
    run_info: dict[str, Any] | None = None,
) -> Tracker:
    """Start (or, with the `run_id` stored in a checkpoint, continue) the W&B run of this training run.

    Main process only: other processes, `tracking.mode=off`, and any failure get the no-op `Tracker`.
    `run_info` (process count, precision, accumulation steps, device, ...), the library versions and
    the processor are the run's `runtime`: written to <run.dir>/runtime.json on every mode (a results
    table reads the processor there) and stored in the W&B config next to the resolved config. The
    accelerator must have been built with `log_with=log_with(cfg.tracking)`."""
    if not accelerator.is_main_process:
        return Tracker()
    try:
        runtime = write_runtime(Path(run_dir), accelerator.device, run_info)
        return _open(cfg, accelerator, Path(run_dir), run_id, runtime)
    except Exception as err:  # anything unforeseen (wandb missing, a broken install, ...): no W&B, training goes on
        _detach(accelerator)
        _warn(
            f"W&B tracking is off for this run ({_first_line(err)}). Training goes on; metrics.jsonl and the figures are in {run_dir}."
        )
        return Tracker()


def write_runtime(run_dir: Path, device: Any, run_info: dict[str, Any] | None) -> dict[str, Any]:
    """The run's environment (library versions, `run_info`, the processor) as <run.dir>/runtime.json;
    returned for the W&B config. A resumed run rewrites it: it describes the newest segment. A file
    that cannot be written is a warning: it labels results, the run does not need it."""
    from vae_dist.processes import describe_processor

    runtime = {**library_versions(), **(run_info or {})}
    try:
        runtime["processor"] = describe_processor(device)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "runtime.json").write_text(json.dumps(runtime, indent=1) + "\n")
    except Exception as err:  # a full disk, permissions, a driver that cannot name its GPU: training goes on
        _warn(
            f"could not write {run_dir / 'runtime.json'} ({_first_line(err)}); results tables will not name the processor."
        )
    return runtime


def _open(cfg: Config, accelerator: Accelerator, run_dir: Path, run_id: str | None, runtime: dict) -> Tracker:
    mode = resolve_mode(cfg.tracking)
    if mode == "off":
        return Tracker()
    if "wandb" not in [str(t) for t in accelerator.log_with]:
        _warn(
            f"tracking.mode={cfg.tracking.mode} but the Accelerator was built without log_with='wandb'; "
            "this run is not tracked in W&B. Build it with Accelerator(log_with=log_with(cfg.tracking))."
        )
        return Tracker()
    if mode == "online":
        problem = None if has_wandb_credentials() else "no W&B credentials (WANDB_API_KEY or `wandb login`)"
        problem = problem or unreachable(base_url())
        if problem:
            _warn(
                f"W&B online tracking is not possible ({problem}); this run logs offline under {run_dir / 'wandb'}. "
                f"Upload it later with `wandb sync {run_dir / 'wandb'}`."
            )
            mode = "offline"
    config = {**cfg.to_dict(), "runtime": runtime}
    if any(v in os.environ for v in LAUNCHER_VARIABLES):  # a launcher may kill our whole tree on SIGTERM
        shield()
    for attempt in ("online", "offline") if mode == "online" else (mode,):
        try:
            return _start(cfg, accelerator, run_dir, run_id, config, attempt)
        except Exception as err:  # wandb raises many types (CommError, UsageError, TimeoutError, ...)
            _detach(accelerator)
            if attempt == "online":
                _teardown()
                _warn(
                    f"W&B could not start the online run ({_first_line(err)}); this run logs offline under "
                    f"{run_dir / 'wandb'}. Upload it later with `wandb sync {run_dir / 'wandb'}`."
                )
            else:
                _warn(
                    f"W&B tracking is off for this run: starting the {attempt} run failed ({_first_line(err)}). "
                    f"Training goes on; metrics.jsonl and the figures are in {run_dir}."
                )
    return Tracker()


def _teardown() -> None:
    """Stop wandb's service after a failed online init, so the offline retry starts clean (wandb issue 9865)."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _start(cfg: Config, accelerator: Accelerator, run_dir: Path, run_id: str | None, config: dict, mode: Mode):
    t = cfg.tracking
    run_dir.mkdir(parents=True, exist_ok=True)
    init = {
        "dir": str(run_dir),
        "id": run_id,
        "resume": "allow",
        "name": t.name or run_dir.resolve().name,
        "entity": t.entity,
        "group": t.group,
        "tags": list(t.tags) or None,
        "mode": mode,
        "reinit": "finish_previous",  # a run left open in this process (a crashed Trainer) never absorbs this one
        "settings": _settings(mode),
    }
    accelerator.init_trackers(t.project, config=config, init_kwargs={"wandb": init})
    tracker = accelerator.get_tracker("wandb")
    run = tracker.tracker
    # Epoch-level charts: test/* against the epoch; the step and epoch counters themselves need no chart.
    for counter in ("train/epoch", "train/step", "test/epoch", "test/step"):
        run.define_metric(counter, hidden=True)
    run.define_metric("test/*", step_metric="test/epoch")
    run.define_metric("test/elbo", step_metric="test/epoch", summary="min,last")
    # A resumed run replays the steps between its checkpoint and the crash: those are in W&B already
    # (the same numbers: training is deterministic), so they are dropped instead of logged twice.
    done = last_logged_step(run_dir, run.id, exclude=_sync_dir(run))
    if getattr(run, "resumed", False):
        done = max(done, run.step - 1)  # online: the server's history continues at run.step
    return WandbTracker(tracker, accelerator, run_dir, mode=mode, logged_through=done)


def _sync_dir(run) -> Path:
    """The folder holding everything of this run segment (offline-run-*): what `wandb sync` takes."""
    return Path(getattr(run, "sync_dir", None) or Path(run.dir).parent)  # sync_dir: wandb >= 0.19


# ------------------------------------------------------------------ the tracker
def _guarded(method):
    """Run a tracker method; the first exception becomes one TrackingWarning and the tracker a no-op."""

    @functools.wraps(method)
    def wrapper(self: WandbTracker, *args, **kwargs):
        if self.broken:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            self.broken = True
            _detach(self.accelerator)
            _warn(
                f"W&B tracking stopped: {method.__name__} failed ({_first_line(err)}). Training goes on; "
                f"metrics.jsonl and the figures are still written to {self.run_dir}."
            )
            return None

    return wrapper


class WandbTracker(Tracker):
    """A W&B run started through Accelerate. Every method is guarded: see `_guarded`."""

    def __init__(self, tracker, accelerator: Accelerator, run_dir: Path, mode: Mode, logged_through: int = -1):
        self.tracker = tracker  # accelerate.tracking.WandBTracker
        self.run = tracker.tracker  # the wandb Run
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.mode = mode
        self.run_id = self.run.id
        self.logged_through = logged_through  # steps <= this were logged by an earlier segment of the run
        self.broken = False
        self.finished = False

    @property
    def local_dir(self) -> Path:
        """This segment's folder under <run.dir>/wandb (what `wandb sync` takes)."""
        return _sync_dir(self.run)

    @_guarded
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars at optimizer step `step` (several calls may share a step; steps never go back)."""
        if step > self.logged_through:
            self.tracker.log(dict(metrics), step=step)

    @_guarded
    def log_images(self, images: dict[str, Path], step: int, drawn_at: int | None = None) -> None:
        """PNG files as W&B images under images/<key>, e.g. the dict `figures.write_figures` returns,
        logged at `step` and captioned with `drawn_at`, the step whose model they show (default: step;
        a figure drawn in the background arrives a few steps later, and W&B steps only go forward)."""
        if step <= self.logged_through:
            return
        import wandb

        shown = step if drawn_at is None else drawn_at
        panels = {f"images/{k}": wandb.Image(str(p), caption=f"{k}, step {shown}") for k, p in images.items() if p}
        if panels:
            self.tracker.log(panels, step=step)

    @_guarded
    def log_model(self, path: Path) -> None:
        """The exported model as a W&B artifact `model-<run id>` of type "model": model.safetensors and
        config.json (`path` is the file or the folder holding them)."""
        import wandb

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        files = [path] if path.is_file() else []
        files += [f for f in (folder / "model.safetensors", folder / "config.json") if f.is_file() and f not in files]
        if not files:
            raise FileNotFoundError(f"no model.safetensors in {folder}")
        metadata = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=metadata)
        for f in files:
            artifact.add_file(str(f))
        self.run.log_artifact(artifact)

    @_guarded
    def finish(self) -> None:
        """End the run (uploads what is left when online). Safe to call twice; end_training then skips W&B."""
        if self.finished:
            return
        self.finished = True
        _detach(self.accelerator)
        self.tracker.finish()
        if self.mode == "offline" and _quiet_by_default():  # wandb's own sync hint is quiet too
            print(
                f"W&B: offline run in {self.local_dir}; upload it with `wandb sync {self.run_dir / 'wandb'}`",
                flush=True,
            )


# ------------------------------------------------------------------ reading a run back
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
