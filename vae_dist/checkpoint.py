"""Checkpoints: safetensors for every tensor, JSON for everything else, never pickle.

A checkpoint is a directory `<run.dir>/checkpoints/step-XXXXXXXX/`:

    model.safetensors      weights, model config in the metadata (export format: VAE.from_pretrained loads it)
    config.json            the model config (from_pretrained convention)
    optimizer.safetensors  Adam moments and step counts, flattened as state.<param>.<name>
    trainer.safetensors    each rank's RNG states and loss sums of the current logging window
    state.json             step, epoch, position in the epoch, run config, optimizer param groups,
                           grad-scaler state, tracker run id, library versions
    manifest.json          size and sha256 of every file above; written last

It is written by the main process, in the background (`CheckpointWriter`: training goes on while
the files are written), into a temporary directory `.tmp-step-XXXXXXXX-<pid>`, every
file fsynced, then renamed into place, so a crash (kill -9, full disk) at any moment leaves either
the complete new checkpoint or none, and the previous ones intact. A write that fails (OSError, or
safetensors' SafetensorError, e.g. "No space left on device (os error 28)") removes its temporary
directory and raises CheckpointError naming the file, the error and the last good checkpoint; the
temporary directory of a save killed outright is removed by `clear_stale_temps` at the next start.

A directory without a matching manifest is never loaded, and neither is a pickle: every
`*.safetensors` file is checked by its first bytes (vae_dist.files) before its manifest, so a
torch.save file renamed model.safetensors is refused as a pickle, on resume from a path and by
train.resume=auto (which skips that checkpoint with a warning, as any other broken one).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vae_dist.config import ConfigError
from vae_dist.files import pickle_kind, pickle_refusal
from vae_dist.model import state_problems

PREFIX = "step-"
MANIFEST = "manifest.json"
FORMAT = 2  # 2: data order from vae_dist.step.BatchPlan, lr from the step, logging-window rows
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """What a checkpoint holds, as loaded on this rank."""

    path: Path
    state: dict[str, Any]  # state.json
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # an Optimizer.state_dict()
    trainer: dict[str, torch.Tensor]  # trainer.safetensors


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ------------------------------------------------------------------ writing
def optimizer_to_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split Optimizer.state_dict() into tensors (for safetensors) and param groups (for JSON)."""
    tensors = {}
    for pid, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().contiguous().cpu()
    return tensors, opt_state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": groups}


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    optimizer_state: dict[str, Any],
    trainer_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write a complete checkpoint atomically (main process only); prune to the newest `keep`.

    A failed write (OSError, or SafetensorError from save_file, e.g. a full disk) removes the
    temporary directory and raises CheckpointError naming the file, the error and the last good
    checkpoint."""
    root = checkpoints_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    current = tmp  # what is being written, for the error message
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors, groups = optimizer_to_tensors(optimizer_state)
        cpu = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        current = tmp / "model.safetensors"
        save_file(cpu, str(current), metadata={"format": "pt", "config": json.dumps(model_config)})
        current = tmp / "optimizer.safetensors"
        save_file(opt_tensors, str(current))
        current = tmp / "trainer.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in trainer_tensors.items()}, str(current))
        current = tmp / "config.json"
        _fsync_write(current, json.dumps(model_config, indent=2).encode())
        current = tmp / "state.json"
        _fsync_write(current, json.dumps({**state, "optimizer_param_groups": groups}, indent=2).encode())
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:  # save_file does not fsync
            current = tmp / name
            with open(current, "rb+") as f:
                os.fsync(f.fileno())
        manifest = {
            "step": step,
            "files": {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files},
        }
        current = tmp / MANIFEST
        _fsync_write(current, json.dumps(manifest, indent=2).encode())
        current = tmp
        _fsync_dir(tmp)
        current = final
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_valid(run_dir, warn=False)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip()
        # Name the file as it would be in the finished checkpoint: the temporary directory is gone.
        name = final / current.relative_to(tmp) if current.is_relative_to(tmp) and current != tmp else current
        raise CheckpointError(
            f"could not write checkpoint {final}: writing {name} failed ({reason}); the partial save was removed, "
            + (
                f"and the previous checkpoint {previous} is intact. "
                if previous
                else "and no earlier checkpoint exists. "
            )
            + "Free disk space or point run.dir at a writable folder, then rerun the same command to resume."
        ) from err
    prune(run_dir, keep)
    return final


def host_copy(tree: Any) -> Any:
    """A copy of `tree` (dicts, lists, tensors, plain values) whose tensors are private CPU copies:
    a snapshot that training may go on changing the originals of."""
    if torch.is_tensor(tree):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v) for v in tree)
    return copy.deepcopy(tree)


class CheckpointWriter:
    """`write_checkpoint` in the background, one checkpoint at a time (main process).

    `submit` snapshots the tensors into host memory and returns the checkpoint's path at once; one
    worker thread writes, fsyncs, renames and prunes while the next steps train, so a save costs the
    loop a device-to-host copy (a few MB), not a disk write. The next `submit` first waits for the
    previous write. A failed write raises its CheckpointError from the next `submit` or `wait`, or
    is returned by `failure`; a process that exits normally or by an exception still finishes the write in progress
    (the thread is joined at exit), and one killed outright leaves the previous checkpoint intact."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-checkpoint")
        self._pending: Future | None = None

    def submit(self, run_dir: Path, step: int, **parts: Any) -> Path:
        """Queue `write_checkpoint(run_dir, step, **parts)` on a snapshot of `parts`."""
        self.wait()
        snapshot = host_copy(parts)
        self._pending = self._pool.submit(write_checkpoint, run_dir, step, **snapshot)
        return checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}"

    def failure(self, wait: bool = True) -> BaseException | None:
        """The error of the last submitted write, or None when it succeeded (or none is pending);
        without `wait`, None while it is still running. Either way it is then no longer pending."""
        pending = self._pending
        if pending is None or not (wait or pending.done()):
            return None
        self._pending = None
        return pending.exception()

    def wait(self) -> None:
        """Return once the last submitted checkpoint is on disk; raise its CheckpointError."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the write in flight (a failure was reported by `failure`/`wait`, or the run is
        failing anyway: not raised again) and stop the thread."""
        try:
            self.wait()
        except CheckpointError:
            pass
        finally:
            self._pool.shutdown(wait=True)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftovers of interrupted saves.

    While any checkpoint is damaged nothing is removed (one warning names them): a damaged checkpoint
    never counts toward `keep`, and no valid checkpoint goes while one may be the last good copy."""
    clear_stale_temps(run_dir)
    found = sorted(checkpoints_dir(run_dir).glob(f"{PREFIX}*"))
    damaged = [f"{path.name} ({problem})" for path in found if (problem := verify(path))]
    if damaged:
        warnings.warn(
            f"checkpoint.keep removes nothing while {checkpoints_dir(run_dir)} holds damaged checkpoints: "
            f"{'; '.join(damaged)}. Move them out of the folder (or delete them) once you no longer need them.",
            stacklevel=2,
        )
        return
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def clear_stale_temps(run_dir: Path) -> list[Path]:
    """Remove the `checkpoints/.tmp-*` directories of saves that never finished (kill -9, power loss, a
    node lost mid-save) and return them; nothing else is touched. Call on the main process at
    start-up, before the first save: such a directory is never loaded, only takes disk space."""
    removed = []
    for tmp in sorted(checkpoints_dir(run_dir).glob(".tmp-*")):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                removed.append(tmp)
    return removed


# ------------------------------------------------------------------ reading
def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint matching its manifest, else what is wrong with which file."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a checkpoint directory"
    problem = pickle_problem(path)  # before the manifest, which a pickle could match
    if problem:
        return problem
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"].items()
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (the save did not finish)"
    except OSError as err:  # a folder in its place, no permission to read it
        return f"{path / MANIFEST} cannot be read ({err.strerror or err})"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return f"{path / MANIFEST} is not valid JSON"
    try:
        for name, meta in files:
            file = path / name
            if not file.is_file():
                return f"{file} is missing" if not file.exists() else f"{file} is not a file"
            if file.stat().st_size != meta["size"]:
                return f"{file} has {file.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
            if _sha256(file) != meta["sha256"]:
                return f"{file} does not match its sha256 in the manifest (corrupt)"
    except OSError as err:
        return f"{getattr(err, 'filename', None) or path} cannot be read ({err.strerror or err})"
    except (KeyError, TypeError):
        return f"{path / MANIFEST} is not a vae_dist manifest"
    return None


def latest_valid(run_dir: Path, warn: bool = True, at_most: int | None = None) -> Path | None:
    """The newest checkpoint under run_dir (of step `at_most` or earlier, if given) that passes
    `verify`; broken ones are skipped with a warning."""
    for path in sorted(checkpoints_dir(run_dir).glob(f"{PREFIX}*"), reverse=True):
        if at_most is not None and not (
            path.name[len(PREFIX) :].isdigit() and int(path.name[len(PREFIX) :]) <= at_most
        ):
            continue
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}; trying the previous one", stacklevel=2)
    return None


def pickle_problem(path: Path) -> str | None:
    """What is a pickle in checkpoint directory `path`, judged by content (any `*.safetensors` that is
    really a torch.save file), or None."""
    for file in sorted(Path(path).glob("*.safetensors")):
        kind = pickle_kind(file) if file.is_file() else None
        if kind:
            return pickle_refusal(file, kind)
    return None


def refuse_pickle(path: Path) -> None:
    """Raise CheckpointError when `path` (a file or a checkpoint directory) is or holds a pickle, by
    content whatever the name, or by a .pt/.pth/.bin/.pkl/.ckpt name."""
    advice = (
        "Resume from a vae_dist checkpoint directory (checkpoints/step-XXXXXXXX), or convert the weights to "
        "safetensors where you trust their origin."
    )
    kind = pickle_kind(path) if path.is_file() else None
    problem = pickle_refusal(path, kind) if kind else pickle_problem(path) if path.is_dir() else None
    if problem:
        raise CheckpointError(f"{problem}. {advice}")
    if path.suffix in PICKLE_SUFFIXES or (path.is_dir() and any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir())):
        raise CheckpointError(
            f"{path} is a pickle-based checkpoint ({path.suffix or 'holds .pt/.bin files'}); vae_dist never unpickles, "
            f"since loading a pickle can run arbitrary code. {advice}"
        )


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """train.resume -> the checkpoint to load, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_valid(run_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"train.resume={resume}: no such file or directory; give a checkpoint directory such as "
            f"{checkpoints_dir(run_dir) / (PREFIX + '00000600')}, or train.resume=auto."
        )
    refuse_pickle(path)
    problem = verify(path)
    if problem:
        raise CheckpointError(
            f"train.resume={resume} cannot be loaded: {problem}. Pick another checkpoint or train.resume=auto."
        )
    return path


def refuse_all_damaged(run_dir: Path) -> None:
    """train.resume=auto found checkpoints but none it can load: starting from step 0 would overwrite
    the run's records and, through checkpoint.keep, its checkpoints. Refuse, naming each one."""
    found = sorted(checkpoints_dir(run_dir).glob(f"{PREFIX}*"))
    if not found:
        return
    problems = "; ".join(f"{problem}" for path in found if (problem := verify(path)))
    folder = checkpoints_dir(run_dir)
    raise CheckpointError(
        f"every checkpoint in {folder} is damaged ({problems}), so this run cannot resume, and it will not "
        f"start over on top of them. Restore a checkpoint from a copy, or move the folder aside to start this "
        f"run.dir anew (mv {folder} {folder}.damaged), or choose a new run.dir."
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a verified checkpoint (safetensors + JSON only)."""
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        opt = optimizer_from_tensors(
            load_file(str(path / "optimizer.safetensors")), state.pop("optimizer_param_groups")
        )
        trainer = load_file(str(path / "trainer.safetensors"))
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({err}); pick another checkpoint.") from err
    return Checkpoint(path=path, state=state, model=model, optimizer=opt, trainer=trainer)


def check_model_shapes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: Path) -> None:
    """Raise naming every mismatched tensor, so a checkpoint of another architecture is a clear error."""
    problems = state_problems(expected, found, found_in="checkpoint")
    if problems:
        raise CheckpointError(
            f"{source} holds another architecture than this config builds ({'; '.join(problems)}). "
            "Use the model config the checkpoint was trained with (its config.json), or another run.dir."
        )


# ------------------------------------------------------------------ the manager
class Stateful(Protocol):
    """What a checkpoint holds of a component: `state_dict()` gives flat JSON-able values (state.json)
    and tensors (this rank's, gathered over the ranks into trainer.safetensors); `load_state_dict`
    gets the whole flat state with this rank's tensors (absent on another process count)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The global torch RNG states of this rank. No training draw uses them (all noise is seeded by
    step, vae_dist.step), so they are restored on the same process count only, for completeness."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def state_dict(self) -> dict[str, Any]:
        return {"rng_cpu": torch.get_rng_state(), **({"rng_cuda": torch.cuda.get_rng_state()} if self.cuda else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"].clone())
        if self.cuda and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].clone())


class CheckpointManager:
    """When to save; save, resume and keep-k; the background writer and its failures.

    What a checkpoint holds is declared once, in `states`: each component's own state_dict (the
    training counters, the step's scaler and skip count, the logging window, the RNG), next to the
    model's weights and the optimizer (through the step). Every method runs on every rank; the main
    process writes. `agree(flag)` is True on every rank when it is on any (vae_dist.run.Run.any_rank);
    `check(step)` is the health check a checkpoint must pass (it never holds diverged weights)."""

    def __init__(self, cfg, accelerator, model, step_fn, states: dict[str, Stateful], agree: Callable, check: Callable):
        self.cfg, self.acc, self.model, self.step_fn = cfg, accelerator, model, step_fn
        self.states, self.agree, self.check = states, agree, check
        self.run_dir = Path(cfg.run.dir)
        self.writer = CheckpointWriter()
        self.saved_step = 0  # the step of the newest checkpoint (0: none, nothing trained yet either)

    # ---------------------------------------------------------------- when
    def due(self, step: int, epochs_done: int | None = None) -> bool:
        """Whether a checkpoint is due after optimizer step `step` (checkpoint.every_steps) or, given
        `epochs_done` at an epoch's end, after that many (checkpoint.every_epochs; the last epoch is
        saved by the end of training itself)."""
        c = self.cfg.checkpoint
        if epochs_done is None:
            return bool(c.every_steps) and step % c.every_steps == 0
        return bool(c.every_epochs) and epochs_done % c.every_epochs == 0 and epochs_done < self.cfg.train.epochs

    # ---------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """All ranks: agree on health, gather the per-rank tensors; the main process snapshots the
        state and writes it atomically in the background (CheckpointWriter), while training goes on."""
        acc = self.acc
        self.check_writer(wait=True)  # the previous save is on disk (or its failure stops every rank)
        self.check(step)
        state: dict[str, Any] = {}
        for component in self.states.values():
            state.update(component.state_dict())
        per_rank = {k: state.pop(k) for k in [k for k, v in state.items() if torch.is_tensor(v)]}
        per_rank = {k: acc.gather(v.to(acc.device)).reshape(acc.num_processes, -1).cpu() for k, v in per_rank.items()}
        path = checkpoints_dir(self.run_dir) / f"{PREFIX}{step:08d}"
        if acc.is_main_process:
            import accelerate

            import vae_dist

            model = acc.unwrap_model(self.model)
            state.update(
                format=FORMAT,
                num_processes=acc.num_processes,
                config=self.cfg.to_dict(),
                versions={
                    "vae_dist": vae_dist.__version__,
                    "torch": torch.__version__,
                    "accelerate": accelerate.__version__,
                    "python": sys.version.split()[0],
                },
            )
            path = self.writer.submit(
                self.run_dir,
                step,
                model_state=model.state_dict(),
                model_config=model.config_dict,
                optimizer_state=self.step_fn.optimizer_state(),
                trainer_tensors=per_rank,
                state=state,
                keep=self.cfg.checkpoint.keep,
            )
        self.saved_step = step
        return path

    def save_at_stop(self, step: int) -> tuple[Path | None, str]:
        """After a stop signal: save when a step ran since the last checkpoint, and wait until it is on
        disk. Returns the checkpoint and what happened, in words."""
        if step > self.saved_step:
            path = self.save(step)
            what = f"checkpoint saved to {path}"
        elif step > 0:
            path = checkpoints_dir(self.run_dir) / f"{PREFIX}{step:08d}"
            what = f"no step ran since the checkpoint {path}"
        else:
            path, what = None, "no optimizer step had run, so there was nothing to save"
        self.check_writer(wait=True)
        return path, what

    def check_writer(self, wait: bool) -> None:
        """Raise on every rank when the main process's background save failed (`wait`: also for the
        save in flight), so that no rank goes on into a collective the main process never joins."""
        error = self.writer.failure(wait) if self.acc.is_main_process else None
        if self.agree(error is not None):
            raise error or CheckpointError(
                "the main process could not write a checkpoint (its message names the file); this process stops too."
            )

    def close(self) -> None:
        self.writer.close()

    def export(self) -> Path:
        """model.safetensors + config.json in run.dir, loadable with VAE.from_pretrained(run.dir)."""
        acc = self.acc
        acc.wait_for_everyone()
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(self.run_dir)
        acc.wait_for_everyone()
        return self.run_dir / "model.safetensors"

    # ---------------------------------------------------------------- resume
    def resume(self) -> Path | None:
        """Load train.resume (auto: the newest valid checkpoint in run.dir) into the model, the
        optimizer and every component, on every rank; None when the run starts fresh."""
        cfg, acc = self.cfg, self.acc
        if cfg.train.resume == "none" and any(checkpoints_dir(self.run_dir).glob(f"{PREFIX}*")):
            raise ConfigError(
                f"train.resume=none but {checkpoints_dir(self.run_dir)} already holds checkpoints that a fresh run "
                "would mix with its own; resume them with train.resume=auto, or choose a new run.dir."
            )
        with warnings.catch_warnings():
            if not acc.is_main_process:
                warnings.simplefilter("ignore")  # the main process reports skipped checkpoints once
            path = resolve_resume(cfg.train.resume, self.run_dir)
        if path is None and cfg.train.resume == "auto":
            refuse_all_damaged(self.run_dir)
        if path is None:
            return None
        ckpt = load_checkpoint(path)
        s = ckpt.state
        check_same_batch(s, cfg.train.batch_size, path)
        model = acc.unwrap_model(self.model)
        check_model_shapes(model.state_dict(), ckpt.model, path / "model.safetensors")
        model.load_state_dict(ckpt.model)
        self.step_fn.load_optimizer(ckpt.optimizer)
        if s.get("format", 1) < 2 and s["step_in_epoch"] > 0:
            warnings.warn(
                f"{path} was written by vae_dist before the batch plan of vae_dist.step (checkpoint format "
                f"{s.get('format', 1)}): the rest of epoch {s['epoch'] + 1} follows the new data order, so "
                "this resume is not bit-exact with the run that wrote it (every later epoch is complete).",
                stacklevel=2,
            )
        # This rank's row of each per-rank tensor, where the process count is the checkpoint's.
        mine = {k: v[acc.process_index] for k, v in ckpt.trainer.items() if v.shape[0] == acc.num_processes}
        for component in self.states.values():
            component.load_state_dict({**s, **mine})
        self.saved_step = s["step"]
        return path


def check_same_batch(state: dict[str, Any], batch_size: int, path: Path) -> None:
    """A resume keeps the global batch: with another, the rest of the epoch would take other examples
    than the batch plan gave the steps already taken, and the step and epoch counts would no longer
    agree. The process count and micro-batch may change (the numbers do not)."""
    saved = state.get("config", {}).get("train", {}).get("batch_size")
    if saved is not None and saved != batch_size:
        raise ConfigError(
            f"{path} was trained with train.batch_size={saved} (the global batch), and this run asks for "
            f"train.batch_size={batch_size}; a resume keeps the global batch. Resume with train.batch_size={saved}, "
            "or train with the new batch size in a new run.dir."
        )
