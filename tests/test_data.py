"""Data: IDX files -> one uint8 tensor per split; clear errors for missing or corrupt files.
Run: pytest tests/test_data.py"""

from __future__ import annotations

import gzip
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, fake_digits, make_mnist, write_idx
from vae_dist.config import DataConfig
from vae_dist.data import IDX_FILES, DataError, load_data, to_unit


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
    # (tmp_path holds this test's name, so "corrupt" alone would match the path: assert the check itself)
    expected = {
        "truncate": "156808 bytes, expected 313616 (16-byte header + 400 images x 784 bytes); the file is truncated",
        "magic": "magic number 0x00000999, expected 0x00000803 for an IDX image file; the file is corrupt",
    }[damage]
    assert f"{path}: {expected}" in str(err.value)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="../shared/data not present")
def test_real_mnist_when_present() -> None:
    train, test = load_data(DataConfig(root=str(SHARED_DATA), download=False))
    assert train.images.shape == (60000, 784) and test.images.shape == (10000, 784)
    assert test.labels.bincount().tolist()[:2] == [980, 1135]


# Each IDX file's header and size are checked before torchvision reads it.
IMAGE_FILES = ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]
LABEL_FILES = ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]


def _load_error(data_root: Path) -> str:
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(data_root), download=False))
    return str(err.value)


@pytest.mark.parametrize("name", IDX_FILES)
def test_file_shorter_than_its_header(data_root: Path, name: str) -> None:
    path = data_root / "MNIST" / "raw" / name
    path.write_bytes(b"\x00\x00\x08")
    header = 16 if "images" in name else 8
    assert f"{path}: 3 bytes, shorter than the {header}-byte header of an IDX" in _load_error(data_root)


@pytest.mark.parametrize("name", IDX_FILES)
def test_wrong_magic_number_says_found_and_expected(data_root: Path, name: str) -> None:
    path = data_root / "MNIST" / "raw" / name
    path.write_bytes(b"\x00\x00\x09\x99" + path.read_bytes()[4:])
    expected = "0x00000803 for an IDX image file" if "images" in name else "0x00000801 for an IDX label file"
    assert f"{path}: magic number 0x00000999, expected {expected}" in _load_error(data_root)


@pytest.mark.parametrize("name", IMAGE_FILES)
def test_labels_where_images_belong(data_root: Path, name: str) -> None:
    path = data_root / "MNIST" / "raw" / name
    path.write_bytes((path.parent / name.replace("images-idx3", "labels-idx1")).read_bytes())
    assert f"{path}: magic number 0x00000801, expected 0x00000803" in _load_error(data_root)


def test_gzip_file_left_compressed_is_named(data_root: Path) -> None:
    path = data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))
    assert f"{path}: magic number 0x1f8b" in (message := _load_error(data_root)) and "gunzip" in message


@pytest.mark.parametrize("name", IMAGE_FILES)
def test_images_that_are_not_28_by_28(data_root: Path, name: str) -> None:
    path = data_root / "MNIST" / "raw" / name
    blob = path.read_bytes()
    n = struct.unpack(">I", blob[4:8])[0]
    path.write_bytes(struct.pack(">IIII", 0x803, n, 32, 32) + bytes(n * 32 * 32))
    assert f"{path}: images of 32 x 32 pixels, expected 28 x 28" in _load_error(data_root)


@pytest.mark.parametrize("damage", ["cut", "extra"])
@pytest.mark.parametrize("name", IDX_FILES)
def test_size_that_does_not_match_the_header(data_root: Path, name: str, damage: str) -> None:
    path = data_root / "MNIST" / "raw" / name
    blob = path.read_bytes()
    path.write_bytes(blob[:-7] if damage == "cut" else blob + bytes(7))
    size = len(blob) - 7 if damage == "cut" else len(blob) + 7
    n = 400 if name.startswith("train") else 150
    detail = f"16-byte header + {n} images x 784 bytes" if "images" in name else f"8-byte header + {n} labels x 1 bytes"
    message = _load_error(data_root)
    assert (
        f"{path}: {size} bytes, expected {len(blob)} ({detail}); the file is truncated or has trailing bytes" in message
    )


@pytest.mark.parametrize("prefix, split", [("train", "train"), ("t10k", "test")])
def test_image_and_label_counts_that_differ(data_root: Path, prefix: str, split: str) -> None:
    raw = data_root / "MNIST" / "raw"
    images, labels = fake_digits(30, 2)
    write_idx(raw, prefix, images, labels)
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 29) + bytes(29))
    message = _load_error(data_root)
    assert f"{raw / f'{prefix}-images-idx3-ubyte'} holds 30 images but" in message
    assert f"{raw / f'{prefix}-labels-idx1-ubyte'} holds 29 labels; the two files of the {split} split" in message


def test_every_bad_file_of_a_split_is_named(data_root: Path) -> None:
    raw = data_root / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x09\x99" + bytes(4))
    message = _load_error(data_root)
    assert f"{raw / 'train-images-idx3-ubyte'}: 0 bytes, shorter than" in message
    assert f"{raw / 'train-labels-idx1-ubyte'}: magic number 0x00000999" in message


# A failed download (no network here: the fetch below is a stand-in) must leave the disk as it found it.
class _Offline:
    """Stands in for torchvision's fetch: writes part of the file, then fails as a dead network does."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, url: str, filename, chunk_size: int = 0) -> None:
        self.calls += 1
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> _Offline:
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("tests never use the network")

    fetch = _Offline()
    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # a guard: nothing below may reach the network
    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", fetch)
    return fetch


def test_failed_download_into_a_new_root_leaves_nothing(tmp_path: Path, offline: _Offline) -> None:
    root = tmp_path / "data"
    with pytest.raises(DataError, match="the download failed") as err:
        load_data(DataConfig(root=str(root), download=True))
    assert offline.calls >= 1  # the stand-in really wrote a partial file
    assert str(root / "MNIST" / "raw") in str(err.value)
    # The cause reaches the user: torchvision's message puts it on its third line, after
    # "Error downloading train-images-idx3-ubyte.gz:" (which alone read as a truncated sentence).
    message = str(err.value)
    assert "Error downloading train-images-idx3-ubyte.gz: Tried https://" in message
    assert "Temporary failure in name resolution" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no root, no MNIST/raw, no partial .gz


def test_failed_download_keeps_what_was_there(tmp_path: Path, offline: _Offline) -> None:
    make_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()  # one file missing: the download is tried
    (raw / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="the download failed"):
        load_data(DataConfig(root=str(tmp_path), download=True))
    assert offline.calls >= 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == [tmp_path / "MNIST", raw]


def test_interrupted_download_leaves_nothing(tmp_path: Path, offline: _Offline, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def interrupted(url: str, filename, chunk_size: int = 0) -> None:
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tv_utils, "_urlretrieve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_data(DataConfig(root=str(tmp_path / "data"), download=True))
    assert list(tmp_path.iterdir()) == []
