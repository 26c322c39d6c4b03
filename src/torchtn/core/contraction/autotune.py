"""Measured planning: time the cost model's best few candidates on the real device and keep the fastest.

Off by default. Turn it on with ``torchtn.set_autotune(True)`` or the environment variable ``TORCHTN_AUTOTUNE=1``
(read when torchtn is imported and again by ``set_autotune(None)``); each plan key is then measured once (a few
milliseconds to a second, depending on the layer) and cached.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

__all__ = ["set_autotune", "autotune_enabled", "time_call", "AUTOTUNE_CANDIDATES"]

AUTOTUNE_CANDIDATES = 4  # how many of the cost model's cheapest plans are timed
_ENV = "TORCHTN_AUTOTUNE"


def _from_environment() -> bool:
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(f"{_ENV}={os.environ[_ENV]!r} is not understood (expected 1, true, yes, on or 0, false, no, "
                      f"off): autotuning stays off", stacklevel=2)
    return False


_state: dict[str, bool] = {"on": _from_environment()}


def set_autotune(enabled: bool | None) -> None:
    """Turn measured planning on (``True``), off (``False``), or back to the ``TORCHTN_AUTOTUNE`` variable (``None``)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r} is not allowed: expected True, False or None")
    _state["on"] = _from_environment() if enabled is None else enabled
    from .planner import clear_plan_cache

    clear_plan_cache()


def autotune_enabled() -> bool:
    """Whether plans are currently measured on the device."""
    return _state["on"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` on ``device`` after ``warmup`` calls (synchronizing CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
