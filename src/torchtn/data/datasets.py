"""Datasets as standardized tensors with fixed train/val/test splits.

Every loader returns a :class:`Dataset`; images keep their shape ``(n, C, H, W)`` (float32, standardized with the
training split's global mean and standard deviation) and models that want rows flatten them (``FC2`` does;
:meth:`Dataset.flattened` gives a flat copy); labels are int64. Splits are fixed (a seeded permutation that
never depends on the user's seed), so every run and every model sees the same examples.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_choice
from .idx import read_idx

__all__ = ["Dataset", "load_dataset", "load_digits", "load_fashion_mnist", "load_mnist", "load_cifar10", "load_cifar100",
           "DATASETS", "FASHION_MNIST_DIR", "DataFilesMissing"]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_SPLIT_SEED = 20240101  # fixed: splits never change with the experiment's seed


class DataFilesMissing(FileNotFoundError):
    """A dataset's files are not where they should be; the message says where to put which files."""


@dataclass
class Dataset:
    """Standardized splits: ``x_*`` ``(n, *image_shape)`` float32 (images ``(n, C, H, W)``), ``y_*`` ``(n,)`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"Dataset {self.name!r}: x_{split} and y_{split} must be tensors, got "
                                f"{type(x).__name__} and {type(y).__name__}")
            if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
                raise ValueError(f"Dataset {self.name!r}: x_{split} {tuple(x.shape)} and y_{split} {tuple(y.shape)} "
                                 f"must have one target per example (the same first dimension)")

    @property
    def num_features(self) -> int:
        """Entries per example (``C·H·W`` for images)."""
        return math.prod(self.x_train.shape[1:])

    def flattened(self) -> "Dataset":
        """The same data with every example as a row ``(n, features)`` (views, no copy)."""
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), -1)

        return dataclasses.replace(self, x_train=flat(self.x_train), x_val=flat(self.x_val), x_test=flat(self.x_test))

    def first(self, n: int | None) -> "Dataset":
        """The same data with only the first ``n`` training rows (``None``, or ``n`` ≥ the split: unchanged)."""
        if n is None or n >= len(self.y_train):
            return self
        return dataclasses.replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train):,} train / {len(self.y_val):,} val / {len(self.y_test):,} test, "
                f"{self.num_features} features {self.image_shape}, {self.num_classes} classes")


def _check_split(name: str, split: str, x: np.ndarray, y: np.ndarray, image_shape: tuple[int, ...],
                 num_classes: int) -> None:
    """Refuse, before any training, data that would train on garbage: empty splits, images of the wrong shape,
    labels that are not integers in ``[0, num_classes)``, image/label counts that differ."""
    if len(x) == 0:
        raise ValueError(f"{name}: the {split} split holds no images")
    if math.prod(x.shape[1:]) != math.prod(image_shape):
        raise ValueError(f"{name}: the {split} images are {tuple(x.shape[1:])}, expected {image_shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels in the {split} split")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: the {split} labels must be a 1-D array of integers, got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name}: the {split} labels must lie in [0, {num_classes}), found {int(y.min())} to "
                         f"{int(y.max())}")


def _finish(name: str, x_trainval: np.ndarray, y_trainval: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
            val_fraction: float, image_shape: tuple[int, ...], num_classes: int) -> Dataset:
    _check_split(name, "train", x_trainval, np.asarray(y_trainval), image_shape, num_classes)
    _check_split(name, "test", x_test, np.asarray(y_test), image_shape, num_classes)
    x_trainval = x_trainval.reshape(len(x_trainval), *image_shape).astype(np.float32)
    x_test = x_test.reshape(len(x_test), *image_shape).astype(np.float32)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(x_trainval))
    n_val = int(round(val_fraction * len(x_trainval)))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x_train = x_trainval[train_idx]
    flat = x_train.reshape(len(x_train), -1)  # statistics over rows, as torchtn 0.1 computed them (same bits)
    mean, std = float(flat.mean()), float(flat.std()) or 1.0

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - mean) / std)

    def lab(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(y, dtype=np.int64))

    return Dataset(name, t(x_train), lab(y_trainval[train_idx]), t(x_trainval[val_idx]), lab(y_trainval[val_idx]),
                   t(x_test), lab(y_test), image_shape, num_classes)


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits (1,797 images, ships with scikit-learn): 20% test, 10% of the rest validation."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    perm = np.random.default_rng(_SPLIT_SEED + 1).permutation(len(x))
    n_test = int(round(0.2 * len(x)))
    test, rest = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _finish("digits", x[rest], y[rest], x[test], y[test], 0.1, (1, 8, 8), 10)


def _find(directory: Path, stems: list[str], dataset: str, how: str) -> Path:
    """The first existing file among ``stem``, ``stem.gz`` for each naming variant."""
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataFilesMissing(f"{dataset}: no {stems[0]}[.gz] in {directory}. {how}")


def _load_idx_dir(directory: Path, dataset: str, how: str, image_shape: tuple[int, ...]) -> Dataset:
    if not directory.is_dir():
        raise DataFilesMissing(f"{dataset}: directory {directory} does not exist. {how}")
    names = {
        "xtr": ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
        "ytr": ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
        "xte": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
        "yte": ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
    }
    expect = {"xtr": (3, image_shape[1:]), "xte": (3, image_shape[1:]), "ytr": (1, None), "yte": (1, None)}
    arrays = {k: read_idx(_find(directory, v, dataset, how), expect_ndim=expect[k][0], expect_tail=expect[k][1])
              for k, v in names.items()}
    return _finish(dataset, arrays["xtr"], arrays["ytr"], arrays["xte"], arrays["yte"], 1 / 12, image_shape, 10)


_IDX_FILES = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST (60k/10k, 28×28) from IDX files; default directory is the Debian package's."""
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    how = (f"Install them with `apt-get install -y dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}) or put "
           f"{_IDX_FILES} there and pass --data-dir.")
    return _load_idx_dir(directory, "fashion-mnist", how, (1, 28, 28))


def load_mnist(data_dir: str | os.PathLike | None) -> Dataset:
    """MNIST (60k/10k, 28×28) from the standard IDX files (``.gz`` or raw) in ``data_dir``."""
    if data_dir is None:
        raise DataFilesMissing(f"mnist: no data directory given. Put {_IDX_FILES} in a directory and pass it "
                               f"(--data-dir DIR, or data_dir=DIR); `make mnist` fetches them into data/mnist")
    return _load_idx_dir(Path(data_dir), "mnist", f"Put {_IDX_FILES} (or their unzipped forms) there; `make mnist` "
                                                  f"fetches them into data/mnist.", (1, 28, 28))


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global that could run code."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/NumPy arrays only: any other global is refused, so no code can run."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refusing to load {module}.{name} from a CIFAR batch file")


_CIFAR_MAX_FILE = 64 << 20  # a real CIFAR-10 batch is ~31 MB
_CIFAR_MAX_ROWS = 10_000


def _read_cifar_batch(path: Path, *, label_key: str = "labels", max_rows: int = _CIFAR_MAX_ROWS,
                      max_bytes: int = _CIFAR_MAX_FILE,
                      what: str = "CIFAR-10 python batch") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (CIFAR-10's ``data_batch_*``, CIFAR-100's ``train``/``test``), validated structurally
    before any array is built from it.

    ``data`` must be a ``(n, 3072)`` uint8 NumPy array and ``label_key`` a flat list (or 1-D array) of ``n`` ints,
    with ``n ≤ max_rows``: nested lists or shared references (which a few kilobytes of pickle can expand to
    gigabytes) are refused, as is any global other than NumPy's array reconstruction.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size:,} bytes: not a {what} (at most {max_bytes:,} expected)")
    try:
        with open(path, "rb") as fh:
            batch = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except _Refused:
        raise
    except Exception as err:  # truncated or malformed pickles raise many types
        raise ValueError(f"{path} is not a {what} ({type(err).__name__})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a {what} (expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path} is not a {what} (no 'data'/{label_key!r} entries)")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or not 0 < data.shape[0] <= max_rows:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a (n ≤ {max_rows}, 3072) uint8 array, got {shape}")
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    else:
        ok = isinstance(labels, list) and len(labels) <= max_rows and all(
            [isinstance(v, int) and not isinstance(v, bool) for v in labels])
    if not ok or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: {label_key!r} must be a flat list of {data.shape[0]} integers")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_dir(data_dir: str | os.PathLike | None, dataset: str, folder: str, files: list[str], how: str) -> Path:
    """The directory holding ``files`` (``data_dir`` or its ``folder`` subdirectory), or a clear error."""
    if data_dir is None:
        raise DataFilesMissing(f"{dataset}: no data directory given. {how}")
    directory = Path(data_dir)
    if (directory / folder).is_dir():
        directory = directory / folder
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DataFilesMissing(f"{dataset}: {', '.join(missing)} missing in {directory}. {how}")
    return directory


def load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
    """CIFAR-10 from its "python version" batches (``data_batch_1..5``, ``test_batch``), read without running code."""
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    how = (f"Put the CIFAR-10 python-version files ({', '.join(files)}) there — the folder cifar-10-batches-py "
           f"from cifar-10-python.tar.gz — and pass it with --data-dir.")
    directory = _cifar_dir(data_dir, "cifar10", "cifar-10-batches-py", files, how)
    parts = [_read_cifar_batch(directory / f) for f in files]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    return _finish("cifar10", x_tr, y_tr, parts[5][0], parts[5][1], 0.1, (3, 32, 32), 10)


def load_cifar100(data_dir: str | os.PathLike | None, labels: str = "fine") -> Dataset:
    """CIFAR-100 from its "python version" files (``train``, ``test``), read without running code (the same checks
    as CIFAR-10's). ``labels``: ``"fine"`` (100 classes, the default) or ``"coarse"`` (20 superclasses)."""
    check_choice("labels", labels, ("fine", "coarse"))
    how = ("Put the CIFAR-100 python-version files (train, test) there — the folder cifar-100-python from "
           "cifar-100-python.tar.gz — and pass it with --data-dir.")
    directory = _cifar_dir(data_dir, "cifar100", "cifar-100-python", ["train", "test"], how)
    read = {"label_key": f"{labels}_labels", "max_rows": 50_000, "max_bytes": 256 << 20,
            "what": "CIFAR-100 python file"}
    x_tr, y_tr = _read_cifar_batch(directory / "train", **read)
    x_te, y_te = _read_cifar_batch(directory / "test", **read)
    return _finish("cifar100", x_tr, y_tr, x_te, y_te, 0.1, (3, 32, 32), 100 if labels == "fine" else 20)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load one of :data:`DATASETS` by name."""
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar100":
        return load_cifar100(data_dir)
    return load_cifar10(data_dir)
