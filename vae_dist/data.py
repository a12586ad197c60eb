"""MNIST-family data held as one uint8 tensor per split; batches are built by indexing it.

The four IDX files under <data.root>/<Dataset>/raw (torchvision's layout) are checked from their
headers and sizes, so a bad file is named with the check it failed, then read here: an IDX file is
that header and the raw bytes, one `torch.frombuffer` once checked. torchvision is imported only to
download missing files (a failed download removes what it wrote): importing it costs ~1.5 s of a
run's start-up on a 2-core CPU. Every split is a single [N, 784] uint8 tensor, so a batch costs one
index operation instead of N PIL conversions. Which examples each process takes, in which order,
is `vae_dist.batches.BatchPlan`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_dist.config import DataConfig
from vae_dist.errors import BadInput

# data.dataset -> the torchvision dataset class that downloads it, whose name is also its folder
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
PIXELS = 28 * 28
# IDX headers are big-endian uint32s: magic, count, then rows and columns for images (yann.lecun.com/exdb/mnist).
# The magic's third byte is the element type (0x08: unsigned byte), the fourth the number of dimensions.
IMAGE_MAGIC = 0x00000803  # 2051: [count, 28, 28] unsigned bytes, 16-byte header
LABEL_MAGIC = 0x00000801  # 2049: [count] unsigned bytes, 8-byte header
_REPLACE = "Replace it with the original (MNIST publishes MD5 sums)."
# Static binarization (and the fixed test binarization under `dynamic`) draws from this seed, so
# every run, whatever its train.seed, sees the same binary test set.
BINARIZE_SEED = 1234


class DataError(BadInput, RuntimeError):
    """The dataset files are missing or unreadable; the message says which and what to do."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 784]; 0..255 grayscale, or 0/255 when binarized
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return self.images.shape[0]


def raw_folder(cfg: DataConfig) -> Path:
    """Where torchvision looks for the four IDX files of `cfg.dataset`."""
    return Path(cfg.root) / DATASETS[cfg.dataset] / "raw"


def _one_line(err: BaseException, limit: int = 400) -> str:
    """The error's whole message on one line: torchvision's download error is several lines (the file,
    then each mirror tried and what it answered), and its first line alone ends in a bare colon."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"


def _idx_count(path: Path, magic: int, problems: list[str]) -> int | None:
    """Checks one IDX file from its header and its size alone; returns its example count, or None after
    adding a sentence that names the file and the check that failed to `problems`."""
    images = magic == IMAGE_MAGIC
    kind, header, item = ("image", 16, PIXELS) if images else ("label", 8, 1)
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < header:
        problems.append(
            f"{path}: {size} bytes, shorter than the {header}-byte header of an IDX {kind} file; the file is "
            f"truncated. {_REPLACE}"
        )
        return None
    found, n = struct.unpack(">II", head[:8])
    if found != magic:
        gzip = " (it starts like a gzip archive: decompress it with gunzip)" if head[:2] == b"\x1f\x8b" else ""
        problems.append(
            f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} for an IDX {kind} file{gzip}; the file "
            f"is corrupt or not an MNIST {kind} file. {_REPLACE}"
        )
        return None
    if images:
        rows, cols = struct.unpack(">II", head[8:16])
        if (rows, cols) != (28, 28):
            problems.append(
                f"{path}: images of {rows} x {cols} pixels, expected 28 x 28; the file is corrupt or not from an "
                f"MNIST-family dataset. {_REPLACE}"
            )
            return None
    expected = header + n * item
    if size != expected:
        problems.append(
            f"{path}: {size} bytes, expected {expected} ({header}-byte header + {n} {kind}s x {item} bytes); the "
            f"file is truncated or has trailing bytes. {_REPLACE}"
        )
        return None
    return n


def check_idx(raw: Path, train: bool) -> None:
    """Check one split's two IDX files from their headers and sizes before they are read; raises a
    DataError naming every bad file and the check it failed. Reads 24 bytes, never the pixels."""
    split, prefix = ("train", "train") if train else ("test", "t10k")
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    problems: list[str] = []
    n_images = _idx_count(images, IMAGE_MAGIC, problems)
    n_labels = _idx_count(labels, LABEL_MAGIC, problems)
    if n_images is not None and n_labels is not None and n_images != n_labels:
        problems.append(
            f"{images} holds {n_images} images but {labels} holds {n_labels} labels; the two files of the "
            f"{split} split must hold the same number of examples. Replace both with the originals (MNIST "
            "publishes MD5 sums)."
        )
    if problems:
        raise DataError(" ".join(problems))


def _remove_created(raw: Path, new_folders: list[Path], old_entries: set[Path]) -> None:
    """Undo a failed download: delete what appeared under `raw` since `old_entries` was listed, then the
    folders in `new_folders` (deepest first) while they are empty. Files that were there before stay."""
    if raw.is_dir():
        new = [p for p in raw.rglob("*") if p not in old_entries]
        for p in sorted(new, key=lambda p: len(p.parts), reverse=True):  # a folder's files before the folder
            try:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink(missing_ok=True)
            except OSError:  # a folder that still holds something: leave it
                pass
    for folder in new_folders:
        try:
            folder.rmdir()
        except FileNotFoundError:  # the attempt failed before it made this folder
            continue
        except OSError:  # not empty (someone else wrote there): keep it and its parents
            break


def write_idx(folder: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write <prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte in the published IDX format: what
    the tests and `make gpu-check` train on where no MNIST is at hand (images [N, 784] or [N, 28, 28])."""
    folder.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", IMAGE_MAGIC, n, 28, 28) + images.to(torch.uint8).numpy().tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", LABEL_MAGIC, n) + labels.to(torch.uint8).numpy().tobytes()
    )


def _read_idx(path: Path, header: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes after an IDX file's header as a uint8 tensor of `shape` (the file passed check_idx)."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)[header:].view(shape)


def _ensure_files(cfg: DataConfig) -> None:
    """The four IDX files in raw_folder(cfg), downloaded with torchvision when missing and allowed."""
    raw = raw_folder(cfg)
    if all((raw / name).is_file() for name in IDX_FILES):
        return
    if cfg.download:
        from torchvision import datasets

        # torchvision creates <root>/<Dataset>/raw and writes .gz files there as it goes; a failed attempt
        # must leave the disk as it found it, so note what is there now.
        new_folders = [p for p in (raw, *raw.parents) if not p.exists()]  # deepest first
        old_entries = set(raw.rglob("*")) if raw.is_dir() else set()
        try:
            for train in (True, False):
                getattr(datasets, DATASETS[cfg.dataset])(root=cfg.root, train=train, download=True)
            return
        except BaseException as err:  # Ctrl-C mid-download leaves partial files too
            _remove_created(raw, new_folders, old_entries)
            if not isinstance(err, Exception):
                raise
            reason = f"the download failed ({_one_line(err)})"  # any network failure: the same advice
    else:
        reason = "data.download=false"
    raise DataError(
        f"{cfg.dataset} is not in {raw} and {reason}. Put the four files {', '.join(IDX_FILES)} "
        f"(uncompressed) in that folder, or point data.root at the folder that holds {DATASETS[cfg.dataset]}/raw/."
    )


def load_split(cfg: DataConfig, train: bool) -> Split:
    """Read one split as uint8 [N, 784]; binarized once here for `static` (and the test split of `dynamic`)."""
    _ensure_files(cfg)
    raw = raw_folder(cfg)
    check_idx(raw, train)
    prefix = "train" if train else "t10k"
    labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", 8, (-1,))
    images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", 16, (len(labels), PIXELS))
    if len(labels) == 0:
        raise DataError(
            f"{raw} holds no {'train' if train else 'test'} examples (the IDX files say 0); replace the files "
            "with the original IDX files."
        )
    if cfg.binarize == "static" or (cfg.binarize == "dynamic" and not train):
        images = binarize(images, torch.Generator().manual_seed(BINARIZE_SEED + int(train)))
    return Split(images=images, labels=labels.long())


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per pixel with p = intensity / 255; returns uint8 0/255 on the same device."""
    u = torch.rand(images.shape, generator=generator, device=images.device)
    return (u * 255 < images).to(torch.uint8) * 255


def load_data(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, test) splits. A truncated or corrupt IDX file becomes a DataError naming the file and the
    check that failed; a file that cannot be read at all (permissions, a folder by that name), the file."""
    try:
        return load_split(cfg, train=True), load_split(cfg, train=False)
    except OSError as err:
        raise DataError(
            f"{err.filename or raw_folder(cfg)} could not be read ({err.strerror or err}); make it a readable "
            f"file, or replace the four files {', '.join(IDX_FILES)} with the originals."
        ) from err


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1], the reference's ToTensor scaling (one kernel: true division
    of the integers computes in float32, the same numbers as `images.float() / 255`)."""
    return torch.div(images, 255.0)
