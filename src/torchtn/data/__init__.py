"""Data: IDX reader and standardized datasets with fixed splits."""
from .datasets import (
    DATASETS,
    DataFilesMissing,
    Dataset,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from .idx import read_idx

__all__ = ["read_idx", "Dataset", "DataFilesMissing", "DATASETS", "load_dataset", "load_digits",
           "load_fashion_mnist", "load_mnist", "load_cifar10", "load_cifar100"]
