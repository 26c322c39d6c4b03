"""IDX reading, dataset loaders and their error messages."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torchtn.data import (
    DataFilesMissing,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from torchtn.data.datasets import FASHION_MNIST_DIR

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, CODES[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a.idx", arr, gz))
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3, 4) and np.array_equal(got, arr)


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    arr = np.zeros((3, 2), np.uint8)
    short = write_idx(tmp_path / "short", arr)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(ValueError, match="promises dims \\(3, 2\\)"):
        read_idx(short)
    with pytest.raises(FileNotFoundError, match="no IDX file"):
        read_idx(tmp_path / "missing")


def make_mnist_dir(directory: Path, n_train=24, n_test=12, variant="-idx", gz=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        suffix_img, suffix_lab = ("-idx3-ubyte", "-idx1-ubyte") if variant == "-idx" else (".idx3-ubyte", ".idx1-ubyte")
        name = lambda s: f"{split}-{s}" + (".gz" if gz else "")  # noqa: E731
        write_idx(directory / name(f"images{suffix_img}"), rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), gz)
        write_idx(directory / name(f"labels{suffix_lab}"), (np.arange(n) % 10).astype(np.uint8), gz)
    return directory


@pytest.mark.parametrize("variant,gz", [("-idx", True), ("-idx", False), (".idx", False)])
def test_mnist_loader(tmp_path, variant, gz):
    data = load_mnist(make_mnist_dir(tmp_path / "m", variant=variant, gz=gz))
    assert data.x_train.shape == (22, 1, 28, 28) and data.x_val.shape == (2, 1, 28, 28)
    assert data.x_test.shape == (12, 1, 28, 28) and data.num_features == 784
    flat = data.flattened()
    assert flat.x_train.shape == (22, 784) and torch.equal(flat.x_train[3], data.x_train[3].reshape(-1))
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert abs(data.x_train.mean().item()) < 1e-4 and abs(data.x_train.std().item() - 1) < 1e-2


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataFilesMissing, match=f"{tmp_path / 'nope'} does not exist.*train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFilesMissing, match="no train-images-idx3-ubyte\\[.gz\\] in"):
        load_mnist(tmp_path / "empty")
    with pytest.raises(DataFilesMissing, match="no data directory given"):
        load_mnist(None)
    with pytest.raises(DataFilesMissing, match="data_batch_1.*test_batch"):
        load_cifar10(tmp_path / "empty")
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        load_dataset("imagenet")


class Evil:
    """Unpickling this would run a shell command: the loaders must refuse it."""

    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def write_cifar(directory: Path, n=10) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n)),
                 b"batch_label": b"x"}
        with open(directory / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return directory


def test_cifar_loader_and_refuses_code(tmp_path):
    data = load_cifar10(write_cifar(tmp_path / "cifar-10-batches-py").parent)
    assert data.x_train.shape == (45, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32)
    assert data.image_shape == (3, 32, 32)

    evil_dir = write_cifar(tmp_path / "evil")
    with open(evil_dir / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_cifar10(evil_dir)


def write_cifar100(directory: Path, n=10) -> Path:
    """CIFAR-100's python-version layout: ``train`` and ``test`` with fine and coarse labels."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"fine_labels": [7 * i % 100 for i in range(n)],
                 b"coarse_labels": [i % 20 for i in range(n)], b"filenames": [b"x.png"] * n, b"batch_label": b"x"}
        with open(directory / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return directory


def test_cifar100_loader_fine_and_coarse_labels_and_refuses_code(tmp_path):
    from torchtn.data import load_cifar100

    root = write_cifar100(tmp_path / "cifar-100-python", n=20).parent
    fine = load_cifar100(root)
    assert fine.num_classes == 100 and fine.image_shape == (3, 32, 32)
    assert fine.x_train.shape == (18, 3, 32, 32) and fine.x_test.shape == (20, 3, 32, 32)
    assert sorted(fine.y_test.tolist()) == sorted(7 * i % 100 for i in range(20))
    coarse = load_cifar100(root, labels="coarse")
    assert coarse.num_classes == 20 and coarse.y_test.tolist() == [i % 20 for i in range(20)]
    assert load_dataset("cifar100", root).num_classes == 100
    with pytest.raises(DataFilesMissing, match="cifar100: train, test missing"):
        load_cifar100(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="labels='medium'"):
        load_cifar100(root, labels="medium")

    evil = write_cifar100(tmp_path / "evil")
    with open(evil / "train", "wb") as fh:
        pickle.dump({b"data": Evil(), b"fine_labels": []}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_cifar100(evil)


def test_digits_splits_are_fixed_and_standardized():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert abs(a.x_train.mean().item()) < 1e-5
    assert a.x_train.shape[1:] == (1, 8, 8) and a.image_shape == (1, 8, 8)
    from sklearn.datasets import load_digits as sk_digits  # the image layout is sklearn's, pixel for pixel
    raw = torch.from_numpy(sk_digits().images).float()
    std_img = a.x_train[0, 0]
    corr = torch.corrcoef(torch.cat([std_img.reshape(1, 64), raw.reshape(-1, 64)]))[0, 1:]
    assert corr.nan_to_num().max() > 0.9999  # some raw image, up to the global affine standardization


fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install -y dataset-fashion-mnist")


@fashion
def test_fashion_mnist_real_files():
    raw = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    assert raw.shape == (60000, 28, 28) and raw.dtype == np.uint8
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    data = load_fashion_mnist()
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (55000, 5000, 10000)
