"""A checkpoint on disk: safetensors for every tensor, JSON for everything else, never pickle.

A checkpoint is a directory `<run.dir>/checkpoints/step-XXXXXXXX/`:

    model.safetensors      weights, model config in the metadata (export format: VAE.from_pretrained loads it)
    config.json            the model config (from_pretrained convention)
    optimizer.safetensors  Adam moments and step counts, flattened as state.<param>.<name>
    trainer.safetensors    each rank's tensors of the components, named component.key (the RNG
                           states, the loss sums of the current logging window), one row per rank
    state.json             the step, process count, run config, library versions and optimizer param
                           groups, and each component's own part under "components" (vae_dist.checkpoint)
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

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vae_dist.errors import EXIT_FAILED, BadInput
from vae_dist.files import pickle_refusal
from vae_dist.model_files import state_problems

# 3: each component's state under its own name; 2: data order from the batch plan, window rows.
FORMAT = 3
PREFIX = "step-"
MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written during training; the message names the file and the last good one."""

    exit_code = EXIT_FAILED


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
    """Write a complete checkpoint atomically (main process only); prune to the newest `keep`. A failed
    write (OSError, or SafetensorError from save_file, e.g. a full disk) removes the temporary directory
    and raises CheckpointWriteError naming the file, the error and the last good checkpoint."""
    root = checkpoints_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    current = tmp  # what is being written, for the error message
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors, groups = optimizer_to_tensors(optimizer_state)
        tensors = {
            "model.safetensors": (model_state, {"format": "pt", "config": json.dumps(model_config)}),
            "optimizer.safetensors": (opt_tensors, None),
            "trainer.safetensors": (trainer_tensors, None),
        }
        for name, (part, metadata) in tensors.items():
            current = tmp / name
            save_file({k: v.detach().contiguous().cpu() for k, v in part.items()}, str(current), metadata=metadata)
        for name, value in (("config.json", model_config), ("state.json", {**state, "optimizer_param_groups": groups})):
            current = tmp / name
            _fsync_write(current, json.dumps(value, indent=2).encode())
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
        # Name the file as it would be in the finished checkpoint: the temporary directory is gone.
        name = final / current.relative_to(tmp) if current.is_relative_to(tmp) and current != tmp else current
        raise write_failed(err, run_dir, final, name) from err
    prune(run_dir, keep)
    return final


def write_failed(err: Exception, run_dir: Path, final: Path, name: Path) -> CheckpointWriteError:
    """The sentence for a save of checkpoint `final` that failed writing file `name`."""
    previous = latest_valid(run_dir, warn=False)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip()
    return CheckpointWriteError(
        f"could not write checkpoint {final}: writing {name} failed ({reason}); the partial save was removed, "
        + (f"and the previous checkpoint {previous} is intact. " if previous else "and no earlier checkpoint exists. ")
        + "Free disk space or point run.dir at a writable folder, then rerun the same command to resume."
    )


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
        refusal = pickle_refusal(file)
        if refusal:
            return refusal
    return None


def refuse_pickle(path: Path) -> None:
    """Raise CheckpointError when `path` (a file or a checkpoint directory) is or holds a pickle, by
    content whatever the name, or by a .pt/.pth/.bin/.pkl/.ckpt name."""
    advice = (
        "Resume from a vae_dist checkpoint directory (checkpoints/step-XXXXXXXX), or convert the weights to "
        "safetensors where you trust their origin."
    )
    problem = pickle_refusal(path) or (pickle_problem(path) if path.is_dir() else None)
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
        if state.get("format", 1) > FORMAT:  # before anything whose layout a newer format may change
            raise CheckpointError(
                f"{path} was written by a newer vae_dist (checkpoint format {state['format']}; this one reads up "
                f"to {FORMAT}); resume it with that release, or upgrade vae_dist."
            )
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
