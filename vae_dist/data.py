"""MNIST-family data held as one uint8 tensor per split; batches are built by indexing it.

torchvision's dataset classes only read (or download) the IDX files. After that every split is a
single [N, 784] uint8 tensor, so a batch costs one index operation instead of N PIL conversions.
The DataLoader handed to Accelerate yields example *indices*; Accelerate shards and shuffles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
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


def _open(cfg: DataConfig, train: bool) -> datasets.MNIST:
    cls = DATASETS[cfg.dataset]
    if all((raw_folder(cfg) / name).is_file() for name in IDX_FILES):
        return cls(root=cfg.root, train=train, download=False)
    if cfg.download:
        try:
            return cls(root=cfg.root, train=train, download=True)
        except Exception as err:  # any network failure: the user needs the same advice
            reason = f"the download failed ({_first_line(err)})"
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
    """(train, test) splits. A truncated or corrupt IDX file becomes a DataError naming the folder."""
    try:
        return load_split(cfg, train=True), load_split(cfg, train=False)
    except DataError:
        raise
    except Exception as err:  # torchvision's IDX reader fails deep inside with a bare shape or magic error
        raise DataError(
            f"the {cfg.dataset} files in {raw_folder(cfg)} could not be read ({_first_line(err)}); a file is probably truncated or corrupt. Replace the four "
            f"files {', '.join(IDX_FILES)} with the originals (MNIST's MD5 sums are published with it)."
        ) from err


class IndexDataset(Dataset):
    """The integers 0..n-1. The DataLoader yields batches of example indices; pixels stay in one tensor."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        # DataLoader calls this once per batch: one tensor instead of n Python ints through collate.
        return torch.tensor(indices, dtype=torch.long)


def _as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


def index_loader(n: int, micro_batch_size: int) -> DataLoader:
    """Shuffled batches of indices. Accelerate's prepare() shards them over processes and, with
    use_seedable_sampler, reseeds the order from train.seed + epoch."""
    return DataLoader(IndexDataset(n), batch_size=micro_batch_size, shuffle=True, collate_fn=_as_is)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1], the reference's ToTensor scaling."""
    return images.float().div_(255.0)
