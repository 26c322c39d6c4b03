"""Argument validation shared by every public entry point.

Each helper raises ``ValueError``/``TypeError`` naming the argument, the value received and what is allowed, so that
bad input fails at the API boundary rather than deep inside a contraction.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Integral, Real

__all__ = [
    "check_positive_int",
    "check_nonnegative_int",
    "check_rel_tol",
    "check_shape",
    "check_choice",
    "check_positive_real",
    "check_nonnegative_real",
    "available_memory",
    "check_fits_in_memory",
    "check_input",
]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an integer ≥ 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or int(value) < 1:  # type: ignore[arg-type]
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")
    return int(value)  # type: ignore[arg-type]


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ≥ 0."""
    if not _is_int(value) or int(value) < 0:  # type: ignore[arg-type]
        raise ValueError(f"{name}={value!r} is not allowed: expected an integer >= 0")
    return int(value)  # type: ignore[arg-type]


def check_positive_real(name: str, value: object, *, allow_none: bool = False, minimum_exclusive: float = 0.0) -> float | None:
    """Return ``float(value)`` if it is a finite real number > ``minimum_exclusive``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(float(value)) or float(value) <= minimum_exclusive:
        raise ValueError(f"{name}={value!r} is not allowed: expected a finite number > {minimum_exclusive:g}")
    return float(value)


def check_ratio(name: str, value: object) -> float | None:
    """A whole-model compression ratio (dense parameters / tensorized ones): ``None`` or a finite number > 1."""
    try:
        return check_positive_real(name, value, allow_none=True, minimum_exclusive=1.0)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not allowed: expected a compression ratio > 1 (dense parameters / "
                         f"tensorized parameters: 2 halves the model)") from None


def check_nonnegative_real(name: str, value: object, *, maximum: float | None = None) -> float:
    """Return ``float(value)`` if it is a finite real number ≥ 0 (and ≤ ``maximum`` when given)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value)) and float(value) >= 0
    if not ok or (maximum is not None and float(value) > maximum):  # type: ignore[arg-type]
        allowed = "a finite number >= 0" if maximum is None else f"a number in [0, {maximum:g}]"
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")
    return float(value)  # type: ignore[arg-type]


def check_rel_tol(name: str, value: object, *, allow_none: bool = True) -> float | None:
    """Return a relative tolerance in the open interval (0, 1)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Real) or isinstance(value, bool) or not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name}={value!r} is not allowed: expected a number in the open interval (0, 1)")
    return float(value)


def check_shape(name: str, value: object) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints (a mode shape such as ``(4, 7, 7, 4)``)."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) == 0:
        raise ValueError(f"{name}={value!r} is not allowed: expected a non-empty sequence of positive integers")
    if not all(_is_int(v) and int(v) >= 1 for v in value):
        raise ValueError(f"{name}={value!r} is not allowed: every entry must be a positive integer")
    return tuple(int(v) for v in value)


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed: expected one of {', '.join(map(repr, choices))}")
    return value


def check_input(x: object, like, *, min_dim: int = 1, expected: str = "(*, in_features)") -> None:
    """Refuse a layer input that is not a tensor of at least ``min_dim`` dimensions with the dtype and device of the
    layer's parameter ``like`` — in one line naming both, where PyTorch would fail inside a contraction (a matmul's
    "expected m1 and m2 to have the same dtype") or, for a 0-d tensor, with an IndexError. Under autocast the dtypes
    may differ (autocast casts each product's operands), as they may for ``nn.Linear``."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor {expected}, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"input has shape {tuple(x.shape)}: expected {expected}")
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        fix = f"cast the input (x.to({like.dtype}))"
        if x.is_floating_point():
            fix += f" or the layer (layer.to({x.dtype}))"
        raise TypeError(f"input has dtype {x.dtype}, the layer's parameters {like.dtype}: {fix}")
    if x.device != like.device:
        raise ValueError(f"input is on {x.device}, the layer's parameters on {like.device}: move one to the other")


def error_line(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut at ``limit`` characters), for one-line error reports."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # (some libraries colour their messages)
    return f"{type(err).__name__}: {text.splitlines()[0][:limit]}" if text else type(err).__name__


MEMORY_CHECK_MIN_BYTES = 1 << 30  # smaller requests are not checked


def available_memory(device) -> int | None:
    """Bytes a new tensor on ``device`` (a ``torch.device``) can take now: free GPU memory for CUDA, the kernel's
    ``MemAvailable`` for the CPU on Linux; ``None`` where it cannot be read (the caller then does not check)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_in_memory(what: str, nbytes: int, device) -> None:
    """Raise ``MemoryError`` naming ``what``, the bytes it needs and the bytes ``device`` has, when it cannot fit —
    instead of an allocation that the operating system answers by killing the process. Reads the free memory only
    for requests of at least ``MEMORY_CHECK_MIN_BYTES`` (so small calls cost nothing)."""
    if nbytes < MEMORY_CHECK_MIN_BYTES:
        return
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs about {_size(nbytes)} on {device}, which has {_size(free)} available")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes / 2**20:.1f} MiB"
