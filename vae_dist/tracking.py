"""Where metrics go besides metrics.jsonl (metrics_file.py): Weights & Biases through Accelerate's trackers.

`Tracker` is the no-op default and the base class; `WandbTracker` is the real one, created on the
main process only by `start_tracker`. The trainer builds its Accelerator with
`log_with=log_with(cfg.tracking)` and calls `start_tracker` once the run directory exists. Which
mode a run uses is wandb_mode.py; reading a run's local W&B files back is wandb_runs.py (its
`local_runs` and `read_wandb_run` are importable from here too).

A tracker problem never stops or slows training: any exception inside W&B becomes one
`TrackingWarning`, the tracker turns into a no-op and detaches itself from the Accelerator (so
`end_training` does not trip over it), and metrics.jsonl and the PNG figures are written as before.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_dist.errors import first_line
from vae_dist.signals import LAUNCHER_VARIABLES
from vae_dist.wandb_mode import Mode, base_url, has_wandb_credentials, resolve_mode, unreachable
from vae_dist.wandb_mode import log_with as log_with  # re-exported: Accelerator(log_with=log_with(cfg.tracking))
from vae_dist.wandb_runs import WANDB_BLOCK as WANDB_BLOCK  # re-exported for the tests
from vae_dist.wandb_runs import last_logged_step
from vae_dist.wandb_runs import local_runs as local_runs  # re-exported: the README reads runs back from here
from vae_dist.wandb_runs import read_wandb_run as read_wandb_run
from vae_dist.wandb_service import shield

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vae_dist.config import Config

INIT_TIMEOUT_S = 30.0  # wandb.init limit (wandb's own default is 90 s); online, once the host answered the probe
FINISH_TIMEOUT_S = 120.0  # upload wait at the end of an online run; what is left stays on disk for `wandb sync`


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


def _why(err: BaseException) -> str:
    """`errors.first_line` of `err`, as it may be shown (`_redact`)."""
    return _redact(first_line(err))


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
            f"W&B tracking is off for this run ({_why(err)}). Training goes on; metrics.jsonl and the figures are in {run_dir}."
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
        _warn(f"could not write {run_dir / 'runtime.json'} ({_why(err)}); results tables will not name the processor.")
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
                    f"W&B could not start the online run ({_why(err)}); this run logs offline under "
                    f"{run_dir / 'wandb'}. Upload it later with `wandb sync {run_dir / 'wandb'}`."
                )
            else:
                _warn(
                    f"W&B tracking is off for this run: starting the {attempt} run failed ({_why(err)}). "
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
                f"W&B tracking stopped: {method.__name__} failed ({_why(err)}). Training goes on; "
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
