"""What a weights file really is, judged by its first bytes, not its name: vae_dist never unpickles.

A pickle renamed `model.safetensors` must be refused as a pickle (unpickling can run arbitrary
code), not reported as a corrupt safetensors file. torch.save writes two formats:

    zip archive   b"PK\\x03\\x04" ... "<name>/data.pkl" ...   (the default since torch 1.6)
    raw pickle    b"\\x80" + protocol byte 2..5 ...           (_use_new_zipfile_serialization=False)

A safetensors file starts with its header length (u64, little-endian) and then "{": a header of
640 bytes also starts with b"\\x80\\x02", so a file that is a plausible safetensors file is never
called a pickle. `pickle_refusal` is the one sentence that refuses a pickle and `refuse_pickle` raises
it: used by model_files.py (exports), checkpoint.py (checkpoints) and the programs that load either.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy format pickles this magic number first (torch/serialization.py, MAGIC_NUMBER)
TORCH_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
WHY = "vae_dist never unpickles, since unpickling can run arbitrary code"


def _plausible_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 8 + header_len <= size and head[8:9] == b"{"


def pickle_kind(path: Path) -> str | None:
    """What pickle format `path` holds, as a phrase ("a PyTorch zip archive written by torch.save ..."),
    or None when it is not a pickle (or not a readable file). Reads the first bytes and, for a zip,
    its list of entries; never unpickles anything."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)  # room for a zip entry name
        size = path.stat().st_size
    except OSError:
        return None
    if _plausible_safetensors(head, size):
        return None
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):  # truncated: the first entry's name is in its local header
            name_len = struct.unpack("<H", head[26:28])[0] if len(head) >= 30 else 0
            names = [head[30 : 30 + name_len].decode("utf-8", "replace")]
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch zip archive written by torch.save (it holds a pickle)"
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        if head[2:14] == TORCH_LEGACY_MAGIC:
            return "a raw pickle written by torch.save(..., _use_new_zipfile_serialization=False)"
        return f"a pickle file (protocol {head[1]})"
    return None


def pickle_refusal(path: Path) -> str | None:
    """The sentence every loader raises when the file `path` holds a pickle, judged by content whatever
    its name ("<path> is a pickle file (protocol 4), not safetensors; vae_dist never unpickles, ..."),
    without what to do, which the caller adds; None when it holds none (or is no file)."""
    kind = pickle_kind(path) if Path(path).is_file() else None
    return f"{path} is {kind}, not safetensors; {WHY}" if kind else None


def refuse_pickle(path: Path, error: Callable[[str], Exception], advice: str) -> None:
    """Raise `error(pickle_refusal(path) + advice)` when the file `path` holds a pickle. `advice` says
    what to do instead and starts with the punctuation that joins it ("; pass ...", ". Convert ...")."""
    refusal = pickle_refusal(path)
    if refusal:
        raise error(refusal + advice)
