"""Checks every job makes on its output directory before anything is written or trained."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._checks import error_line
from ..data import Dataset
from ..io import ModelFileError, read_metadata, read_tensors

__all__ = ["check_writable", "check_resume", "recorded_settings"]


def check_writable(out: Path) -> None:
    """``out`` can be created (no file on its path) and written by this user."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise ValueError(f"--out {out} cannot be created: {probe} is a file, not a directory")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be written: {probe} is not writable by you")


def recorded_settings(out: Path, first_files: Sequence[str], key: str, job: str) -> dict | None:
    """The settings dict stored under ``metadata[key]`` in the first of ``first_files`` found in ``out`` (or its
    ``checkpoints/``); ``None`` when ``out`` holds none of them."""
    for name in first_files:
        for path in (out / name, out / "checkpoints" / name):
            if path.exists():
                meta = read_metadata(path).get("metadata", {})
                cfg = meta.get(key) if isinstance(meta, dict) else None
                if not isinstance(cfg, dict):
                    raise ModelFileError(f"{path} records no {job} settings: it is not part of a torchtn {job} run")
                return cfg
    return None


def check_resume(out: Path, job: str, first_files: Sequence[str], key: str, now: dict,
                 normalize: Callable[[dict], dict]) -> None:
    """``out`` holds a readable run of ``job`` made with the same settings (named when they differ).

    Temporary files left by a kill are removed first; every model file is read in full, so a truncated or damaged
    one is refused now rather than half-way through the run.
    """
    if not out.is_dir():
        raise ValueError(f"--resume: {out} does not exist; there is no run to continue")
    for tmp in [*out.glob(".*.tmp"), *(out / "checkpoints").glob(".*.tmp")]:
        tmp.unlink()  # left by a kill between writing and renaming; never a finished file
    for path in [*out.glob("*.safetensors"), *(out / "checkpoints").glob("*.safetensors")]:
        read_metadata(path)
        read_tensors(path)
    recorded = recorded_settings(out, first_files, key, job)
    if recorded is None:
        raise ValueError(f"--resume: {out} holds no torchtn {job} run (no {first_files[0]}); start a new run with "
                         f"another --out")
    try:
        before = normalize(recorded)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--resume: the settings recorded in {out} are invalid ({err})") from None
    check_same_settings(out, before, normalize(now))


def check_same_settings(out: Path, recorded: dict, now: dict) -> None:
    """``--resume``: the settings given now equal those the run in ``out`` recorded (the differing ones named)."""
    diff = [f"{k}: {recorded.get(k)!r} → {now.get(k)!r}" for k in sorted(now) if recorded.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"--resume: the run in {out} was made with other settings ({'; '.join(diff)}); leave "
                         f"those options out (the run's own are taken) or start a new run with another --out")


def check_model_fits_data(model: torch.nn.Module, arch: str, data: Dataset) -> None:
    """``model`` maps two of ``data``'s training inputs to ``(2, num_classes)`` class scores, or a one-line error
    naming ``arch`` (the model's mode is left as it was)."""
    x = data.x_train[:2]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as err:
        raise ValueError(f"--arch {arch} cannot take {data.name} images of shape {data.image_shape} "
                         f"({error_line(err, 160)})") from None
    finally:
        model.train(was)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), data.num_classes):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"--arch {arch} maps a {tuple(x.shape)} batch of {data.name} to {got}; expected "
                         f"({len(x)}, {data.num_classes}) class scores")
