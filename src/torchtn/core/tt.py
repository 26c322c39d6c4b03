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
from ._dtypes import HALF, half_to_float
from .svd import truncated_svd

__all__ = [
    "tt_svd",
    "tt_to_dense",
    "tt_round",
    "left_canonical",
    "right_canonical",
    "balanced",
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
    "tt_compression_ratio",
    "tt_init_std",
    "check_cores",
    "merge_cores",
    "TTMatrix",
]

Cores = list[torch.Tensor]
RankSpec = int | Sequence[int] | None


def check_cores(cores: Sequence[torch.Tensor], name: str = "cores") -> list[torch.Tensor]:
    """Validate a TT-matrix: 4-D cores whose bonds chain, with ``r_0 = r_d = 1``."""
    if isinstance(cores, torch.Tensor):
        raise ValueError(f"{name} must be a non-empty list of 4-D tensors (r_prev, m, n, r_next), got one tensor of "
                         f"shape {tuple(cores.shape)}")
    if len(cores) == 0:
        raise ValueError(f"{name} must be a non-empty list of 4-D tensors (r_prev, m, n, r_next), got an empty "
                         f"{type(cores).__name__}")
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


def tt_compression_ratio(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> float:
    """Dense entries ``∏m·∏n`` / core entries (≥ 1 means smaller). The one definition every report uses."""
    return math.prod(in_shape) * math.prod(out_shape) / tt_num_params(in_shape, out_shape, ranks)


def tt_init_std(in_shape: Sequence[int], ranks: Sequence[int], variance: float) -> float:
    """Std of i.i.d. zero-mean Gaussian cores giving ``Var(W_ij) = variance``.

    ``W_ij`` is a sum over ``∏_k r_k`` bond paths of products of ``d`` core entries, so
    ``Var(W_ij) = σ^{2d} ∏_k r_k`` and ``σ = (variance / ∏ r_k)^{1/(2d)}``.
    """
    return (variance / math.prod(ranks[1:-1])) ** (0.5 / len(in_shape))


def gaussian(shape: Sequence[int], std: float, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """I.i.d. ``N(0, std²)`` entries of ``shape``; on the ``meta`` device (where a model file's layers are built
    first, to check their shapes) an empty tensor: PyTorch's meta ``randn`` imports sympy, ~0.4 s in a fresh process,
    to make values that do not exist."""
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    kw = {"generator": generator} if generator is not None else {}
    return torch.randn(tuple(shape), dtype=dtype, device=device, **kw).mul_(std)


def _interleave(matrix: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> torch.Tensor:
    """``(M, N)`` → tensor with modes ``(m_1 n_1, …, m_d n_d)``."""
    d = len(in_shape)
    t = matrix.reshape(*out_shape, *in_shape)
    order = [i for k in range(d) for i in (k, d + k)]
    return t.permute(order).reshape([m * n for m, n in zip(out_shape, in_shape)])


def _error_budget(norm_sq: float, rel_tol: float | None, d: int) -> float | None:
    """Squared error each of the ``d−1`` bonds may discard so that the whole stays within ``rel_tol·‖W‖``."""
    if rel_tol is None or d < 2:
        return None
    return rel_tol**2 * norm_sq / (d - 1)


def _truncating_sweep(first: torch.Tensor, absorb, out_shape: Sequence[int], in_shape: Sequence[int],
                      caps: Sequence[int], budget: float | None) -> Cores:
    """The left-to-right SVD sweep shared by :func:`tt_svd` and :func:`tt_round`.

    ``first`` is the unfolding ``(m_1 n_1, rest)``; ``absorb(k, carry)`` returns the unfolding
    ``(r_{k-1} m_k n_k, rest)`` at site ``k`` given the carried factor ``S·Vᵀ`` of the previous bond.
    """
    d = len(in_shape)
    cores: Cores = []
    mat, r_prev = first, 1
    for k in range(d - 1):
        u, s, vh, _ = truncated_svd(mat, caps[k], budget)
        r = s.shape[0]
        cores.append(u.reshape(r_prev, out_shape[k], in_shape[k], r))
        mat, r_prev = absorb(k + 1, s[:, None] * vh), r
    cores.append(mat.reshape(r_prev, out_shape[-1], in_shape[-1], 1))
    return [c.contiguous() for c in cores]


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
    silently clipped to :func:`bond_caps`. Unfoldings that are large in absolute terms and asked for a small rank use
    a randomized SVD (:func:`~torchtn.core.svd.truncated_svd`); the others an exact one.
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
    work = matrix.detach()
    if not work.is_floating_point():
        raise TypeError(f"matrix has dtype {work.dtype}: expected a floating-point tensor")
    if work.is_meta:
        raise ValueError("matrix is on the meta device (it has no values): TT-SVD needs the weights themselves")
    half = work.dtype in HALF  # no half-precision SVD or QR kernels: float32 inside
    work = half_to_float(work)
    if not bool(torch.isfinite(work).all()):
        raise ValueError("matrix contains NaN or infinite values: TT-SVD needs finite entries")
    # Work on W / max|W| so that squared norms neither overflow nor underflow (float32 spans ~1e±38 only); the scale
    # goes back into the last core.
    scale = float(work.abs().max())
    if scale == 0.0:
        scale = 1.0
    work = work / scale
    budget = _error_budget(float(torch.linalg.vector_norm(work.double()) ** 2), rel_tol, len(in_shape))
    t = _interleave(work, in_shape, out_shape)
    sizes = t.shape
    cores = _truncating_sweep(t.reshape(sizes[0], -1), lambda k, carry: carry.reshape(carry.shape[0] * sizes[k], -1),
                              out_shape, in_shape, inner_ranks(max_rank, in_shape, out_shape), budget)
    if scale != 1.0:
        cores[-1] = cores[-1] * scale
    return [c.to(matrix.dtype) for c in cores] if half else cores


def _merge_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two neighbouring (merged) cores ``(ra, M, N, r)``, ``(r, m, n, rb)`` → ``(ra, M·m, N·n, rb)``."""
    ra, mm, nn, r = a.shape
    _, m, n, rb = b.shape
    out = (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(ra, mm, nn, m, n, rb)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(ra, mm * m, nn * n, rb)


def merge_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract neighbouring cores into one core ``(r_first, ∏m, ∏n, r_last)`` (C-order modes). Differentiable.

    The one place where cores are multiplied together: :func:`tt_to_dense` is the merge of all cores, and the
    contraction planner's merged groups are merges of spans. Merges pairwise (a balanced tree), so that the big
    products and permuting copies happen once, at the top, instead of once per absorbed core.
    """
    level = list(cores)
    while len(level) > 1:
        level = [_merge_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores into the dense weight ``(∏ m_k, ∏ n_k)``. Differentiable."""
    merged = merge_cores(check_cores(cores))
    return merged.reshape(merged.shape[1], merged.shape[2])


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


def _computable(cores: Sequence[torch.Tensor]) -> tuple[Cores, torch.dtype | None]:
    """Detached cores in a dtype LAPACK takes — float16 / bfloat16 go up to float32 (no half-precision QR or SVD
    kernels) — and the dtype to cast results back to (``None``: no cast)."""
    cores = [c.detach() for c in check_cores(cores)]
    return [half_to_float(c) for c in cores], cores[0].dtype if cores[0].dtype in HALF else None


def _back(tensors: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    return tensors if dtype is None else [t.to(dtype) for t in tensors]


def left_canonical(cores: Sequence[torch.Tensor]) -> Cores:
    """Same TT-matrix with cores ``0 … d−2`` left-orthogonal (the norm sits in the last core)."""
    cores, dtype = _computable(cores)
    for k in range(len(cores) - 1):
        cores[k], rr = _qr_left(cores[k])
        cores[k + 1] = _absorb_left(rr, cores[k + 1])
    return _back(cores, dtype)


def right_canonical(cores: Sequence[torch.Tensor]) -> Cores:
    """Same TT-matrix with cores ``1 … d−1`` right-orthogonal (the norm sits in the first core)."""
    cores, dtype = _computable(cores)
    for k in range(len(cores) - 1, 0, -1):
        cores[k], ll = _qr_right(cores[k])
        cores[k - 1] = _absorb_right(cores[k - 1], ll)
    return _back(cores, dtype)


def balanced(cores: Sequence[torch.Tensor]) -> Cores:
    """Same TT-matrix in the gauge where, at every inner bond (left to right), each bond index carries the same norm
    on both sides: core ``k``'s slice ``[..., j]`` and core ``k+1``'s slice ``[j, ...]`` are scaled by ``c_j`` and
    ``1/c_j`` (exact: the product is unchanged). For two cores ``A·B`` every column of ``A`` then has the norm of the
    matching row of ``B``. Canonical or data-weighted forms can put orders of magnitude between the cores; an
    optimizer that steps every entry by about the same amount (Adam) then moves the small core far too fast."""
    cores = [c.detach() for c in check_cores(cores)]
    for k in range(len(cores) - 1):
        left = torch.linalg.vector_norm(cores[k].reshape(-1, cores[k].shape[-1]), dim=0)
        right = torch.linalg.vector_norm(cores[k + 1].reshape(cores[k + 1].shape[0], -1), dim=1)
        ok = (left > 0) & (right > 0)
        scale = torch.where(ok, (right / torch.where(ok, left, 1)).sqrt(), torch.ones_like(left))
        cores[k] = cores[k] * scale
        cores[k + 1] = cores[k + 1] / scale[:, None, None, None]
    return cores


def tt_round(cores: Sequence[torch.Tensor], max_rank: RankSpec = None, rel_tol: float | None = None) -> Cores:
    """Re-truncate a TT-matrix (TT-rounding): right-orthogonalize, then SVD-truncate left to right.

    Same rules as :func:`tt_svd`: ``‖W − W_rounded‖_F ≤ rel_tol·‖W‖_F``; ``max_rank`` caps every bond (an int) or each
    inner bond (a sequence). Costs ``O(d r³ m n)``; never forms the dense matrix.
    """
    cores, dtype = _computable(cores)
    cores = right_canonical(cores)
    rel_tol = check_rel_tol("rel_tol", rel_tol)
    out_shape, in_shape = tt_shapes(cores)
    budget = _error_budget(float(torch.linalg.vector_norm(cores[0]).double() ** 2), rel_tol, len(cores))

    def absorb(k: int, carry: torch.Tensor) -> torch.Tensor:
        g = _absorb_left(carry, cores[k])
        return g.reshape(-1, g.shape[3])

    first = cores[0].reshape(-1, cores[0].shape[3])
    return _back(_truncating_sweep(first, absorb, out_shape, in_shape, inner_ranks(max_rank, in_shape, out_shape),
                                   budget), dtype)


def bond_spectra(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values across each inner bond (the Schmidt values of the interleaved tensor), descending.

    Computed from a mixed-canonical form — left-orthogonalize, then SVD from the right — never by densifying.
    Entry ``k`` (0-based) is the cut between sites ``≤ k+1`` and ``> k+1``.
    """
    cores, dtype = _computable(cores)
    cores = left_canonical(cores)
    spectra: list[torch.Tensor] = []
    for k in range(len(cores) - 1, 0, -1):
        r_prev, m, n, r = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(r_prev, m * n * r), full_matrices=False)
        spectra.append(s)
        cores[k - 1] = _absorb_right(cores[k - 1], u * s)
    return _back(spectra[::-1], dtype)


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


class TTMatrix:
    """A matrix ``W`` ``(∏m, ∏n)`` held as an MPO / TT-matrix: cores ``(r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.

    The one type every tensorized layer shares. It owns the MPO math — construction by TT-SVD, the dense form,
    rounding, canonical forms, bond spectra, entanglement entropies and the bond report, parameter counts and the
    compression ratio, and planning and applying ``x Wᵀ``. It is a light, immutable view over the core tensors (they
    are shared, not copied, and may be ``nn.Parameter``s with gradients), so building one is free: a layer makes one
    from its current cores whenever it needs one, and a bond whose rank changed simply gives a new ``TTMatrix`` with
    new shapes (plans are keyed on the ranks, see :mod:`torchtn.core.contraction`).
    """

    __slots__ = ("cores",)

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        self.cores: tuple[torch.Tensor, ...] = tuple(check_cores(cores))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, matrix: torch.Tensor, in_shape: Sequence[int], out_shape: Sequence[int], *,
                   max_rank: RankSpec = None, rel_tol: float | None = None, weighting=None) -> "TTMatrix":
        """TT-SVD of ``matrix`` ``(out_features, in_features)``; see :func:`tt_svd` for the truncation rule.

        ``weighting`` (a :class:`~torchtn.core.weighting.Weighting`): truncate in the data's norm instead (the
        layer's output error on calibration data; ``rel_tol`` then bounds that relative error); the cores come back
        in ``matrix``'s dtype."""
        if weighting is None:
            return cls(tt_svd(matrix, in_shape, out_shape, max_rank=max_rank, rel_tol=rel_tol))
        weighting.check(in_shape, out_shape)
        tt = cls(tt_svd(weighting.apply(matrix), in_shape, out_shape, max_rank=max_rank, rel_tol=rel_tol))
        return weighting.undo(tt).to(dtype=matrix.dtype)

    @classmethod
    def random(cls, in_shape: Sequence[int], out_shape: Sequence[int], rank: RankSpec, *, variance: float,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> "TTMatrix":
        """Gaussian cores with every inner bond at ``rank`` (clipped to :func:`bond_caps`) and ``Var(W_ij) = variance``."""
        in_shape, out_shape = check_shape("in_shape", in_shape), check_shape("out_shape", out_shape)
        ranks = (1, *inner_ranks(rank, in_shape, out_shape, name="rank"), 1)
        std = tt_init_std(in_shape, ranks, variance)
        return cls([gaussian((ranks[k], m, n, ranks[k + 1]), std, dtype=dtype, device=device, generator=generator)
                    for k, (m, n) in enumerate(zip(out_shape, in_shape))])

    # ------------------------------------------------------------------ shapes and counts
    @property
    def in_shape(self) -> tuple[int, ...]:
        return tt_shapes(self.cores)[1]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tt_shapes(self.cores)[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, the shape of the dense matrix."""
        out_shape, in_shape = tt_shapes(self.cores)
        return math.prod(out_shape), math.prod(in_shape)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Bond dimensions ``(1, r_1, …, r_{d-1}, 1)``."""
        return tt_ranks(self.cores)

    @property
    def num_params(self) -> int:
        """Core entries ``Σ_k r_{k-1} m_k n_k r_k``."""
        return tt_num_params(self.in_shape, self.out_shape, self.ranks)

    @property
    def compression_ratio(self) -> float:
        """Dense entries / core entries (≥ 1 means smaller)."""
        return tt_compression_ratio(self.in_shape, self.out_shape, self.ranks)

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    @property
    def device(self) -> torch.device:
        return self.cores[0].device

    # ------------------------------------------------------------------ algebra
    def to_dense(self) -> torch.Tensor:
        """The matrix ``(∏m, ∏n)``; differentiable with respect to the cores."""
        return tt_to_dense(self.cores)

    def round(self, max_rank: RankSpec = None, rel_tol: float | None = None) -> "TTMatrix":
        """TT-rounding (:func:`tt_round`): the same matrix within ``rel_tol`` and/or with bonds capped at ``max_rank``."""
        return TTMatrix(tt_round(self.cores, max_rank=max_rank, rel_tol=rel_tol))

    def left_canonical(self) -> "TTMatrix":
        return TTMatrix(left_canonical(self.cores))

    def right_canonical(self) -> "TTMatrix":
        return TTMatrix(right_canonical(self.cores))

    def balanced(self) -> "TTMatrix":
        """The same matrix with every bond's norm shared equally by its two cores (:func:`balanced`)."""
        return TTMatrix(balanced(self.cores))

    def spectra(self) -> list[torch.Tensor]:
        """Singular values across each inner bond, from a mixed-canonical form (never densifies)."""
        return bond_spectra(self.cores)

    def entanglement_entropy(self) -> torch.Tensor:
        """``(d−1,)`` float64 entropies ``−Σ p ln p`` per inner bond."""
        return entanglement_entropy(self.cores)

    def bond_report(self) -> list[BondInfo]:
        """Per inner bond: rank, entropy, error that the next smaller rank would cause."""
        return bond_report(self.cores)

    def detach(self) -> "TTMatrix":
        return TTMatrix([c.detach() for c in self.cores])

    def to(self, *args, **kwargs) -> "TTMatrix":
        """``Tensor.to`` applied to every core."""
        return TTMatrix([c.to(*args, **kwargs) for c in self.cores])

    # ------------------------------------------------------------------ x Wᵀ
    def plan(self, batch: int, **options):
        """The (cached) contraction plan of ``(batch, ∏n) -> (batch, ∏m)``; options as :func:`~torchtn.core.contraction.plan_tt_linear`."""
        from .contraction import plan_for

        return plan_for(self.cores, batch, **options)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, **options) -> torch.Tensor:
        """``(*, ∏n) -> (*, ∏m)``: ``x Wᵀ + bias``, planned, never forming ``W`` unless that is cheapest."""
        from .contraction import tt_linear_apply

        return tt_linear_apply(x, self.cores, bias, **options)

    def __repr__(self) -> str:
        return (f"TTMatrix(out_shape={self.out_shape}, in_shape={self.in_shape}, ranks={self.ranks}, "
                f"compression={self.compression_ratio:.1f}x, dtype={self.dtype})")
