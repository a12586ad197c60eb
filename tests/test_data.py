"""Data: IDX files -> one uint8 tensor per split; clear errors for missing or corrupt files.
Run: pytest tests/test_data.py"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, make_mnist
from vae_dist.config import DataConfig
from vae_dist.data import IDX_FILES, DataError, index_loader, load_data, to_unit


def test_splits_are_uint8_tensors(data_root: Path) -> None:
    train, test = load_data(DataConfig(root=str(data_root), download=False))
    assert train.images.shape == (400, 784) and train.images.dtype == torch.uint8
    assert test.images.shape == (150, 784) and test.labels.shape == (150,)
    x = to_unit(train.images[:5])
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() == 1.0


def test_other_datasets_use_their_own_folder(tmp_path: Path) -> None:
    make_mnist(tmp_path, folder="FashionMNIST")
    train, _ = load_data(DataConfig(root=str(tmp_path), dataset="fashion_mnist", download=False))
    assert len(train) == 400


def test_binarization(data_root: Path) -> None:
    static_a, _ = load_data(DataConfig(root=str(data_root), binarize="static", download=False))
    static_b, _ = load_data(DataConfig(root=str(data_root), binarize="static", download=False))
    assert set(static_a.images.unique().tolist()) == {0, 255}
    assert torch.equal(static_a.images, static_b.images)  # fixed once, the same in every run
    dyn_train, dyn_test = load_data(DataConfig(root=str(data_root), binarize="dynamic", download=False))
    grey, grey_test = load_data(DataConfig(root=str(data_root), download=False))
    assert torch.equal(dyn_train.images, grey.images)  # dynamic: the trainer samples pixels each step
    assert set(dyn_test.images.unique().tolist()) == {0, 255}  # ... and the test split is fixed binary
    assert not torch.equal(dyn_test.images, grey_test.images)


def test_missing_files_name_the_files_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(tmp_path / "nowhere"), download=False))
    message = str(err.value)
    assert all(name in message for name in IDX_FILES)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message


@pytest.mark.parametrize("damage", ["truncate", "magic"])
def test_corrupt_file_is_a_clear_error(data_root: Path, damage: str) -> None:
    path = data_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x00\x00\x09\x99" + blob[4:])
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(data_root), download=False))
    assert "corrupt" in str(err.value) and str(data_root / "MNIST" / "raw") in str(err.value)


def test_index_loader_yields_index_tensors() -> None:
    batches = list(index_loader(10, 4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="../shared/data not present")
def test_real_mnist_when_present() -> None:
    train, test = load_data(DataConfig(root=str(SHARED_DATA), download=False))
    assert train.images.shape == (60000, 784) and test.images.shape == (10000, 784)
    assert test.labels.bincount().tolist()[:2] == [980, 1135]
