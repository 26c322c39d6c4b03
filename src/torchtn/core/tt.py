"""Tensor-train (TT) matrix algebra: decomposition, reconstruction, rounding, canonical forms, spectra.

Layout (``docs/conventions``): a weight ``W`` of shape ``(M, N) = (∏ m_k, ∏ n_k)`` is held as cores ``G_k`` of shape
``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1`` and ``W[i, j] = G_1[:, i_1, j_1, :] ⋯ G_d[:, i_d, j_d, :]``,
multi-indices in C order. Pure functions on lists of tensors; no ``torch.nn``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_rel_tol, check_shape
from .svd import truncated_svd

__all__ = [
    "tt_svd",
    "tt_to_dense",
    "tt_round",
    "left_canonical",
    "right_canonical",
    "bond_spectra",
    "entanglement_entropy",
    "spectrum_entropy",
    "BondInfo",
    "bond_report",
    "bond_caps",
    "inner_ranks",
    "tt_ranks",
    "tt_shapes",
    "tt_num_params",
    "check_cores",
]

Cores = list[torch.Tensor]
RankSpec = int | Sequence[int] | None


def check_cores(cores: Sequence[torch.Tensor], name: str = "cores") -> list[torch.Tensor]:
    """Validate a TT-matrix: 4-D cores whose bonds chain, with ``r_0 = r_d = 1``."""
    if isinstance(cores, torch.Tensor) or len(cores) == 0:
        raise ValueError(f"{name} must be a non-empty list of 4-D tensors (r_prev, m, n, r_next), got {type(cores).__name__}")
    for k, g in enumerate(cores):
        if not isinstance(g, torch.Tensor) or g.dim() != 4:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name}[{k}] has shape {shape}: expected a 4-D tensor (r_prev, m, n, r_next)")
        if k and cores[k - 1].shape[3] != g.shape[0]:
            raise ValueError(f"{name}[{k - 1}] ends in bond {cores[k - 1].shape[3]} but {name}[{k}] starts with {g.shape[0]}")
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(f"{name}: the outer bonds must be 1, got {cores[0].shape[0]} and {cores[-1].shape[3]}")
    return list(cores)


def tt_shapes(cores: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(out_shape, in_shape)`` of a TT-matrix: the ``m_k`` and the ``n_k``."""
    return tuple([int(g.shape[1]) for g in cores]), tuple([int(g.shape[2]) for g in cores])


def tt_ranks(cores: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Bond dimensions ``(r_0, …, r_d)`` (with ``r_0 = r_d = 1``)."""
    return (int(cores[0].shape[0]),) + tuple([int(g.shape[3]) for g in cores])


def bond_caps(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, ...]:
    """Largest useful rank at each inner bond: ``min(∏_{l≤k} m_l n_l, ∏_{l>k} m_l n_l)``, ``k = 1 … d−1``."""
    sizes = [m * n for m, n in zip(out_shape, in_shape)]
    return tuple([min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)])


def inner_ranks(value: RankSpec, in_shape: Sequence[int], out_shape: Sequence[int], name: str = "max_rank") -> list[int]:
    """Per-inner-bond rank caps from ``value``, clipped to :func:`bond_caps` (``None``: the caps themselves).

    ``value`` is an int (every bond), one int per inner bond, or a full ``(1, r_1, …, r_{d-1}, 1)`` tuple; ``name``
    is the argument name used in error messages.
    """
    caps = bond_caps(in_shape, out_shape)
    if value is None:
        return list(caps)
    if isinstance(value, Sequence) and not isinstance(value, str):
        ranks = list(value)
        if len(ranks) == len(caps) + 2 and ranks[0] == ranks[-1] == 1:  # full (r_0, …, r_d) tuple
            ranks = ranks[1:-1]
        if len(ranks) != len(caps):
            raise ValueError(f"{name}={tuple(value)!r} has {len(ranks)} entries: expected an int or one per inner "
                             f"bond ({len(caps)})")
        for r in ranks:
            check_positive_int(name, r)
        return [min(int(r), c) for r, c in zip(ranks, caps)]
    r = check_positive_int(name, value)
    return [min(r, c) for c in caps]


def tt_num_params(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of core entries ``Σ_k r_{k-1} m_k n_k r_k`` for ranks ``(r_0, …, r_d)``."""
    return sum([ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(out_shape, in_shape))])


def _interleave(matrix: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> torch.Tensor:
    """``(M, N)`` → tensor with modes ``(m_1 n_1, …, m_d n_d)``."""
    d = len(in_shape)
    t = matrix.reshape(*out_shape, *in_shape)
    order = [i for k in range(d) for i in (k, d + k)]
    return t.permute(order).reshape([m * n for m, n in zip(out_shape, in_shape)])


def tt_svd(
    matrix: torch.Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    max_rank: RankSpec = None,
    rel_tol: float | None = None,
) -> Cores:
    """TT-SVD (Oseledets 2011) of a weight ``(out_features, in_features)`` into cores ``(r_{k-1}, m_k, n_k, r_k)``.

    ``rel_tol = ε`` guarantees ``‖W − W_tt‖_F ≤ ε‖W‖_F`` (each of the ``d−1`` bonds may discard ``ε²‖W‖²/(d−1)``);
    ``max_rank`` (an int, or one int per inner bond) caps the bonds; with both, the smaller rank wins. Ranks are
    silently clipped to :func:`bond_caps`. Large unfoldings with a small ``max_rank`` use a randomized SVD.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"matrix has shape {shape}: expected a 2-D tensor (out_features, in_features)")
    in_shape, out_shape = check_shape("in_shape", in_shape), check_shape("out_shape", out_shape)
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape={in_shape} and out_shape={out_shape} must have the same length (pad with 1's)")
    if math.prod(out_shape) != matrix.shape[0] or math.prod(in_shape) != matrix.shape[1]:
        raise ValueError(
            f"out_shape={out_shape} × in_shape={in_shape} describe a {math.prod(out_shape)}×{math.prod(in_shape)} "
            f"matrix, but matrix is {matrix.shape[0]}×{matrix.shape[1]}"
        )
    rel_tol = check_rel_tol("rel_tol", rel_tol)
    d = len(in_shape)
    caps = inner_ranks(max_rank, in_shape, out_shape)
    work = matrix.detach()
    if not work.is_floating_point():
        raise TypeError(f"matrix has dtype {work.dtype}: expected a floating-point tensor")
    budget = None
    if rel_tol is not None and d > 1:
        budget = rel_tol**2 * float(torch.linalg.vector_norm(work).double() ** 2) / (d - 1)
    t = _interleave(work, in_shape, out_shape)
    sizes = t.shape
    cores: Cores = []
    carry = t.reshape(sizes[0], -1)
    r_prev = 1
    for k in range(d - 1):
        carry = carry.reshape(r_prev * sizes[k], -1)
        u, s, vh, _ = truncated_svd(carry, caps[k], budget)
        r = s.shape[0]
        cores.append(u.reshape(r_prev, out_shape[k], in_shape[k], r))
        carry = s[:, None] * vh
        r_prev = r
    cores.append(carry.reshape(r_prev, out_shape[-1], in_shape[-1], 1))
    return [c.contiguous() for c in cores]


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores into the dense weight ``(∏ m_k, ∏ n_k)``. Differentiable."""
    cores = check_cores(cores)
    out_shape, in_shape = tt_shapes(cores)
    # acc has modes (m_1..m_k, n_1..n_k, r_k), flattened as (M_k, N_k, r_k)
    acc = cores[0].reshape(out_shape[0], in_shape[0], -1)
    for g in cores[1:]:
        r, m, n, r_next = g.shape
        mk, nk = acc.shape[0], acc.shape[1]
        acc = (acc.reshape(mk * nk, r) @ g.reshape(r, m * n * r_next)).reshape(mk, nk, m, n, r_next)
        acc = acc.permute(0, 2, 1, 3, 4).reshape(mk * m, nk * n, r_next)
    return acc.reshape(acc.shape[0], acc.shape[1])


def _qr_left(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-orthogonalize one core: ``g = q · r`` with ``q`` ``(r_prev, m, n, r')`` left-orthogonal."""
    r_prev, m, n, r_next = g.shape
    q, rr = torch.linalg.qr(g.reshape(r_prev * m * n, r_next))
    return q.reshape(r_prev, m, n, q.shape[1]), rr


def _qr_right(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-orthogonalize one core: ``g = l · q`` with ``q`` ``(r', m, n, r_next)`` right-orthogonal."""
    r_prev, m, n, r_next = g.shape
    q, rr = torch.linalg.qr(g.reshape(r_prev, m * n * r_next).T)
    return q.T.reshape(q.shape[1], m, n, r_next), rr.T


def _absorb_left(mat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``mat`` ``(a, r_prev)`` times core ``(r_prev, m, n, r)`` → ``(a, m, n, r)``."""
    r_prev, m, n, r = g.shape
    return (mat @ g.reshape(r_prev, -1)).reshape(mat.shape[0], m, n, r)


def _absorb_right(g: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Core ``(r_prev, m, n, r)`` times ``mat`` ``(r, b)`` → ``(r_prev, m, n, b)``."""
    r_prev, m, n, r = g.shape
    return (g.reshape(-1, r) @ mat).reshape(r_prev, m, n, mat.shape[1])


def left_canonical(cores: Sequence[torch.Tensor]) -> Cores:
    """Same TT-matrix with cores ``0 … d−2`` left-orthogonal (the norm sits in the last core)."""
    cores = [c.detach() for c in check_cores(cores)]
    for k in range(len(cores) - 1):
        cores[k], rr = _qr_left(cores[k])
        cores[k + 1] = _absorb_left(rr, cores[k + 1])
    return cores


def right_canonical(cores: Sequence[torch.Tensor]) -> Cores:
    """Same TT-matrix with cores ``1 … d−1`` right-orthogonal (the norm sits in the first core)."""
    cores = [c.detach() for c in check_cores(cores)]
    for k in range(len(cores) - 1, 0, -1):
        cores[k], ll = _qr_right(cores[k])
        cores[k - 1] = _absorb_right(cores[k - 1], ll)
    return cores


def tt_round(cores: Sequence[torch.Tensor], max_rank: RankSpec = None, rel_tol: float | None = None) -> Cores:
    """Re-truncate a TT-matrix (TT-rounding): right-orthogonalize, then SVD-truncate left to right.

    Same rules as :func:`tt_svd`: ``‖W − W_rounded‖_F ≤ rel_tol·‖W‖_F``; ``max_rank`` caps every bond (an int) or each
    inner bond (a sequence). Costs ``O(d r³ m n)``; never forms the dense matrix.
    """
    cores = right_canonical(cores)
    rel_tol = check_rel_tol("rel_tol", rel_tol)
    out_shape, in_shape = tt_shapes(cores)
    d = len(cores)
    caps = inner_ranks(max_rank, in_shape, out_shape)
    budget = None
    if rel_tol is not None and d > 1:
        budget = rel_tol**2 * float(torch.linalg.vector_norm(cores[0]).double() ** 2) / (d - 1)
    for k in range(d - 1):
        r_prev, m, n, r = cores[k].shape
        u, s, vh, _ = truncated_svd(cores[k].reshape(r_prev * m * n, r), caps[k], budget)
        cores[k] = u.reshape(r_prev, m, n, s.shape[0])
        cores[k + 1] = _absorb_left(s[:, None] * vh, cores[k + 1])
    return [c.contiguous() for c in cores]


def bond_spectra(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values across each inner bond (the Schmidt values of the interleaved tensor), descending.

    Computed from a mixed-canonical form — left-orthogonalize, then SVD from the right — never by densifying.
    Entry ``k`` (0-based) is the cut between sites ``≤ k+1`` and ``> k+1``.
    """
    cores = left_canonical(cores)
    spectra: list[torch.Tensor] = []
    for k in range(len(cores) - 1, 0, -1):
        r_prev, m, n, r = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(r_prev, m * n * r), full_matrices=False)
        spectra.append(s)
        cores[k - 1] = _absorb_right(cores[k - 1], u * s)
    return spectra[::-1]


def spectrum_entropy(s: torch.Tensor) -> torch.Tensor:
    """Entanglement entropy ``−Σ p ln p`` of ``p = s² / Σ s²`` (0 for a product state, ``ln r`` for a flat spectrum)."""
    p = s.double() ** 2
    total = p.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64)
    p = p[p > 0] / total
    return -(p * torch.log(p)).sum()


def entanglement_entropy(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entropy at each inner bond, ``(d−1,)`` float64, from :func:`bond_spectra`."""
    spectra = bond_spectra(cores)
    if not spectra:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([spectrum_entropy(s) for s in spectra])


@dataclass(frozen=True)
class BondInfo:
    """Diagnostics of one inner bond (1-based ``bond`` k: the cut between sites ≤ k and > k)."""

    bond: int
    rank: int
    entropy: float  # −Σ p ln p of the Schmidt spectrum
    next_rank_error: float  # relative Frobenius error that dropping to rank − 1 at this bond alone would cause


def bond_report(cores: Sequence[torch.Tensor]) -> list[BondInfo]:
    """Per inner bond: rank, entanglement entropy, and the truncation error of the next smaller rank.

    The error of keeping ``r − 1`` values at bond k is ``s_r / ‖s‖`` (exact in the mixed-canonical form at that bond).
    """
    out = []
    for k, s in enumerate(bond_spectra(cores), start=1):
        norm = float(torch.linalg.vector_norm(s.double()))
        err = float(s[-1]) / norm if len(s) > 1 and norm > 0 else 1.0
        out.append(BondInfo(k, int(s.shape[0]), float(spectrum_entropy(s)), err))
    return out
