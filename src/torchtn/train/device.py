"""Which device a training job runs on: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
from __future__ import annotations

import os
import re

import torch

__all__ = ["resolve_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(spec: str | torch.device | None = "auto", *, name: str = "device") -> torch.device:
    """The ``torch.device`` a job named by ``spec`` runs on.

    ``"auto"`` (or ``None``) is CUDA when PyTorch sees a GPU for every process on this node (``LOCAL_WORLD_SIZE``
    under ``torchrun``, else one), else the CPU. ``"cuda"`` without an index is this process's GPU: ``LOCAL_RANK``
    under ``torchrun`` (one GPU per process, as NCCL requires), else GPU 0. Asking for a GPU that is not there is an
    error naming what is (``name``: how the error calls the argument, e.g. ``"--device"``).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        spec = "cuda" if torch.cuda.is_available() and per_node <= torch.cuda.device_count() else "cpu"
    if not isinstance(spec, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise ValueError(f"{name}={spec!r} is not allowed: expected {DEVICE_CHOICES}")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{name}={spec!r} is not allowed: PyTorch sees no CUDA GPU here "
                         f"(torch {torch.__version__}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if ":" in spec:
        index = int(spec.split(":")[1])
        if index >= count:
            raise ValueError(f"{name}={spec!r} is not allowed: this machine has {count} CUDA GPU(s), "
                             f"indices 0..{count - 1}")
        return torch.device("cuda", index)
    index = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if index >= count:
        raise ValueError(f"{name}={spec!r} is not allowed here: this process (LOCAL_RANK={index}) needs GPU {index} "
                         f"and this machine has {count} CUDA GPU(s); start at most {count} process(es) per node "
                         f"(torchrun --nproc_per_node) or use 'cpu'")
    return torch.device("cuda", index)
