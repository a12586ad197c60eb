"""MNIST-family data held as one uint8 tensor per split; batches are built by indexing it.

torchvision's dataset classes only read (or download) the IDX files; their headers and sizes are
checked here first, so a bad file is named with the check it failed, and a failed download removes what
it wrote. After that every split is a single [N, 784] uint8 tensor, so a batch costs one index
operation instead of N PIL conversions. Which examples each process takes, in which order, is
`vae_dist.step.BatchPlan`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from vae_dist.config import DataConfig

DATASETS = {
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
    "kmnist": datasets.KMNIST,
}
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


class DataError(RuntimeError):
    """The dataset files are missing or unreadable; the message says which and what to do."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 784]; 0..255 grayscale, or 0/255 when binarized
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return self.images.shape[0]


def raw_folder(cfg: DataConfig) -> Path:
    """Where torchvision looks for the four IDX files of `cfg.dataset`."""
    return Path(cfg.root) / DATASETS[cfg.dataset].__name__ / "raw"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


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
    """Check one split's two IDX files from their headers and sizes before torchvision reads them; raises a
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


def _open(cfg: DataConfig, train: bool) -> datasets.MNIST:
    cls = DATASETS[cfg.dataset]
    raw = raw_folder(cfg)
    if all((raw / name).is_file() for name in IDX_FILES):
        check_idx(raw, train)
        return cls(root=cfg.root, train=train, download=False)
    if cfg.download:
        # torchvision creates <root>/<Dataset>/raw and writes .gz files there as it goes; a failed attempt
        # must leave the disk as it found it, so note what is there now.
        new_folders = [p for p in (raw, *raw.parents) if not p.exists()]  # deepest first
        old_entries = set(raw.rglob("*")) if raw.is_dir() else set()
        try:
            return cls(root=cfg.root, train=train, download=True)
        except BaseException as err:  # Ctrl-C mid-download leaves partial files too
            _remove_created(raw, new_folders, old_entries)
            if not isinstance(err, Exception):
                raise
            reason = f"the download failed ({_first_line(err)})"  # any network failure: the same advice
    else:
        reason = "data.download=false"
    raise DataError(
        f"{cfg.dataset} is not in {raw_folder(cfg)} and {reason}. Put the four files "
        f"{', '.join(IDX_FILES)} (uncompressed) in that folder, or point data.root at the folder that "
        f"holds {cls.__name__}/raw/."
    )


def load_split(cfg: DataConfig, train: bool) -> Split:
    """Read one split as uint8 [N, 784]; binarized once here for `static` (and the test split of `dynamic`)."""
    ds = _open(cfg, train)
    images = ds.data
    labels = ds.targets
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels) or len(images) == 0:
        raise DataError(
            f"{raw_folder(cfg)} holds {tuple(images.shape)} images and {len(labels)} labels for the "
            f"{'train' if train else 'test'} split; expected N x 28 x 28 images with N labels. "
            "Replace the files with the original IDX files."
        )
    images = images.reshape(-1, PIXELS).contiguous()
    if cfg.binarize == "static" or (cfg.binarize == "dynamic" and not train):
        images = binarize(images, torch.Generator().manual_seed(BINARIZE_SEED + int(train)))
    return Split(images=images, labels=labels.long())


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per pixel with p = intensity / 255; returns uint8 0/255 on the same device."""
    u = torch.rand(images.shape, generator=generator, device=images.device)
    return (u * 255 < images).to(torch.uint8) * 255


def load_data(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, test) splits. A truncated or corrupt IDX file becomes a DataError naming the file (or, for what
    the header checks cannot see, the folder)."""
    try:
        return load_split(cfg, train=True), load_split(cfg, train=False)
    except DataError:
        raise
    except Exception as err:  # torchvision's IDX reader fails deep inside with a bare shape or magic error
        raise DataError(
            f"the {cfg.dataset} files in {raw_folder(cfg)} could not be read ({_first_line(err)}); a file is probably truncated or corrupt. Replace the four "
            f"files {', '.join(IDX_FILES)} with the originals (MNIST's MD5 sums are published with it)."
        ) from err


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1], the reference's ToTensor scaling (one kernel: true division
    of the integers computes in float32, the same numbers as `images.float() / 255`)."""
    return torch.div(images, 255.0)
