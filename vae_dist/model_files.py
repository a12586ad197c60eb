"""An exported model's files: `model.safetensors` (the weights, with the architecture in its metadata)
and `config.json` (the architecture), in a folder or on the Hugging Face Hub.

`VAE.from_pretrained(folder)` loads them through this module, with safetensors only: a pickle is
refused whatever its name (unpickling can run arbitrary code), the weights must fit the
architecture of `config.json` exactly (strict=True by default), and every problem with the files is
one `ModelFileError` whose message names the file and what to do. The network itself is model.py;
this module never imports it (the class to build is passed in).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vae_dist.errors import first_line
from vae_dist.files import refuse_pickle

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOAD_ADVICE = "pass a folder written by vae-train or VAE.save_pretrained (model.safetensors + config.json)"
ARCHITECTURE_KEYS = ("x_dim", "hidden_dims", "z_dim")  # any of them given: config.json was read


class ModelFileError(ValueError):
    """An exported model cannot be loaded: a missing file, a pickle, a truncated or corrupt safetensors
    file, or weights of another architecture. The message names the file and says what to do."""


def write_weights(model: torch.nn.Module, folder: Path) -> None:
    """model.safetensors with the model config in its metadata, so the file alone rebuilds the model."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(Path(folder) / WEIGHTS_NAME),
        metadata={"format": "pt", "config": json.dumps(model.config_dict)},
    )


# ------------------------------------------------------------------ where the model is
def locate(name: str | Path, hub_kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """(what to hand huggingface_hub's from_pretrained, why the Hub was not asked or None).

    A file must be a model.safetensors that is no pickle, and stands for its folder. A name that is
    no local path but could be a Hub id ("owner/name") is asked of the Hub once (`_ask_hub`); the
    reason it could not be, or local_files_only=True in `hub_kwargs`, means the local cache only."""
    source = Path(name)
    if source.is_file():
        refuse_pickle(source, ModelFileError, f"; {LOAD_ADVICE}.")
        if source.name != WEIGHTS_NAME:
            raise ModelFileError(f"{source} is a file, not a model folder; {LOAD_ADVICE}.")
        source = source.parent
    offline = None
    if not source.exists():
        if not _is_hub_id(str(name)):
            raise ModelFileError(f"model folder {source} does not exist (in {Path.cwd()}); {LOAD_ADVICE}.")
        offline = _ask_hub(str(name), hub_kwargs.get("revision"), hub_kwargs.get("token"))
        if not offline and hub_kwargs.get("local_files_only"):
            offline = "local_files_only=True"
    return (str(source) if source.is_dir() else str(name)), offline


@contextmanager
def config_errors(model_id: str, offline: str | None) -> Iterator[None]:
    """huggingface_hub's errors while it reads config.json, as ModelFileError sentences: a config.json
    that is no JSON, and a Hub id that is neither asked (`offline` says why) nor in the local cache."""
    try:
        yield
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{Path(model_id) / CONFIG_NAME} is not valid JSON ({err}); {LOAD_ADVICE}.") from None
    except LocalEntryNotFoundError:  # the mixin's config.json, from the cache only
        raise ModelFileError(
            f"{model_id} is neither a folder or file in {Path.cwd()} nor a model in the local Hugging Face "
            f"cache, and the Hub could not be asked ({offline or 'it stopped answering'}); {LOAD_ADVICE}."
        ) from None


def weights_file(model_id: str, **hub_kwargs) -> Path:
    """The model.safetensors of folder `model_id`, or downloaded from the Hub (`hub_kwargs`: revision,
    cache_dir, force_download, token, local_files_only): never the pickled pytorch_model.bin that
    huggingface_hub falls back to."""
    if Path(model_id).is_dir():
        file = Path(model_id) / WEIGHTS_NAME
        if not file.is_file():
            raise ModelFileError(f"{Path(model_id)} holds no {WEIGHTS_NAME}; {LOAD_ADVICE}.")
        return file
    try:
        return Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, **hub_kwargs))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelFileError(
            f"{model_id} is neither a local folder nor a Hub model with a {WEIGHTS_NAME} "
            f"({type(err).__name__}); {LOAD_ADVICE}. A pickled pytorch_model.bin is never loaded."
        ) from None


def _ask_hub(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """Ask the Hub once whether `repo_id` holds a model.safetensors: None when it does (the download
    goes on as usual), why the Hub could not be asked when it could not (offline mode, no network:
    the caller then reads the local cache only), and ModelFileError when the Hub answers that there is
    no such model. One request, never retried: without a network huggingface_hub retries its
    requests for about 26 s before it falls back to its cache, and a mistyped local path, which looks
    like a Hub id ("runs/typo"), should not wait for that."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, WEIGHTS_NAME, revision=revision), token=token)
    except GatedRepoError:  # it exists, behind an access request: the download's own error says how
        return None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelFileError(
            f"{repo_id} is neither a folder or file in {Path.cwd()} nor a model with a {WEIGHTS_NAME} on the "
            f"Hugging Face Hub ({constants.ENDPOINT} answered {type(err).__name__}; a private model needs "
            f"`hf auth login` or token=); {LOAD_ADVICE}."
        ) from None
    except HfHubHTTPError:  # the Hub answered something else (a server error): the download reports it
        return None
    except Exception as err:  # no network, DNS, a proxy: the library's own exception types vary by version
        return f"{constants.ENDPOINT} could not be reached: {type(err).__name__}: {str(err)[:120]}"
    return None


def _is_hub_id(text: str) -> bool:
    """Whether `text` could name a Hub model ("owner/name"); a local path that does not exist cannot."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


# ------------------------------------------------------------------ the weights
def load(cls: type[torch.nn.Module], file: Path, model_kwargs: dict[str, Any], strict: bool = True) -> torch.nn.Module:
    """`cls(**model_kwargs)` (the architecture in `file`'s metadata when no config.json gave one) with
    the weights of safetensors `file`: strict, every weight of the architecture with its shape and no
    other; without `strict`, missing and unexpected keys pass but a wrong shape does not."""
    refuse_pickle(file, ModelFileError, f". Convert it to safetensors where you trust its origin, or {LOAD_ADVICE}.")
    state, metadata = _read(file)
    if not any(k in model_kwargs for k in ARCHITECTURE_KEYS):  # no config.json
        model_kwargs = {**_metadata_config(metadata), **model_kwargs}
    try:
        model = cls(**model_kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(
            f"the config of {file} ({CONFIG_NAME} or the file's metadata) does not build a VAE ({err}); {LOAD_ADVICE}."
        ) from None
    problems = state_problems(model.state_dict(), state, strict=strict)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ModelFileError(
            f"{file} holds weights of another architecture than VAE({_kwargs_text(model.config_dict)}) "
            f"({shown}); load it with the config it was trained with (its {CONFIG_NAME}), or another file."
        )
    model.load_state_dict(state, strict=strict)
    return model


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of safetensors `file` on the CPU, and its metadata."""
    try:
        with safe_open(str(file), "pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ModelFileError(
            f"{file} is not a readable safetensors file ({first_line(err, 200)}; truncated or corrupt?); {LOAD_ADVICE}."
        ) from None


def _metadata_config(metadata: dict[str, str]) -> dict:
    """The model config that write_weights stores in the safetensors metadata, or {}."""
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _kwargs_text(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def state_problems(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], strict: bool = True, found_in: str = "file"
) -> list[str]:
    """Every tensor of `found` that does not fit `expected`: missing and unexpected keys (strict only)
    and wrong shapes, each as "<key>: ..." (`found_in` names where `found` came from); [] when the
    state dict loads."""
    problems = []
    if strict:
        problems += [f"{k}: missing" for k in expected if k not in found]
        problems += [f"{k}: unexpected" for k in found if k not in expected]
    problems += [
        f"{k}: {found_in} {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    return problems
