"""Balanced factorization of a dimension into ``d`` integer factors (the *mode shape* of a TT-matrix)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from .._checks import check_positive_int, check_shape

__all__ = ["factorize", "prime_factors", "default_num_cores", "suggest_shapes", "resolve_shapes"]



def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, ascending (``prime_factors(784) == [2, 2, 2, 2, 7, 7]``)."""
    n = check_positive_int("n", n)
    out: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


@lru_cache(maxsize=1024)
def _best_split(n: int, d: int) -> tuple[int, ...]:
    """Factors of ``n`` into exactly ``d`` parts (ascending) minimizing the spread of their logarithms.

    Exhaustive over assignments of prime factors to parts, with states deduplicated as sorted tuples, so repeated
    primes (``2^20``) stay cheap.
    """
    primes = prime_factors(n)[::-1]
    target = math.log(n) / d
    states = {tuple([1] * d)}
    for p in primes:
        states = {tuple(sorted(s[:j] + (s[j] * p,) + s[j + 1:])) for s in states for j in range(d)}
    return min(states, key=lambda s: (round(sum((math.log(b) - target) ** 2 for b in s), 12), s))


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` factors that are as equal as possible, arranged small–large–small.

    The arrangement puts the largest factors in the middle (``factorize(784, 4) == (4, 7, 7, 4)``, Gao et al.'s shape),
    which keeps the bonds near the ends cheap. Padding with 1's happens when ``n`` has fewer than ``d`` prime factors.
    """
    n = check_positive_int("n", n)
    d = check_positive_int("d", d)
    asc = _best_split(n, d)
    left = list(asc[0::2])
    right = list(asc[1::2])
    return tuple(left + right[::-1])


def default_num_cores(in_features: int, out_features: int, max_cores: int = 4) -> int:
    """Number of cores used when no shapes are given: ``max_cores`` unless neither size has that many prime factors."""
    most = max(len(prime_factors(in_features)), len(prime_factors(out_features)))
    return max(1, min(max_cores, most))


def suggest_shapes(in_features: int, out_features: int, d: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_shape, out_shape)`` of ``d`` balanced factors each (``d`` chosen by :func:`default_num_cores` if None)."""
    if d is None:
        d = default_num_cores(in_features, out_features)
    return factorize(in_features, d), factorize(out_features, d)


def resolve_shapes(in_features: int, out_features: int, in_shape: Sequence[int] | None = None,
                   out_shape: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``(in_shape, out_shape)``: given ones are checked against the sizes, missing ones suggested."""
    if in_shape is None and out_shape is None:
        return suggest_shapes(in_features, out_features)
    if in_shape is None or out_shape is None:
        d = len(check_shape("in_shape" if in_shape is not None else "out_shape", in_shape if in_shape is not None else out_shape))
        auto_in, auto_out = suggest_shapes(in_features, out_features, d)
        in_shape = auto_in if in_shape is None else in_shape
        out_shape = auto_out if out_shape is None else out_shape
    in_shape, out_shape = check_shape("in_shape", in_shape), check_shape("out_shape", out_shape)
    if math.prod(in_shape) != in_features:
        raise ValueError(f"in_shape={in_shape} multiplies to {math.prod(in_shape)}, but in_features={in_features}")
    if math.prod(out_shape) != out_features:
        raise ValueError(f"out_shape={out_shape} multiplies to {math.prod(out_shape)}, but out_features={out_features}")
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape={in_shape} and out_shape={out_shape} must have the same number of modes (pad with 1's)")
    return in_shape, out_shape
