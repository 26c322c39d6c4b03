"""Two-site tensors of a TT-matrix: the local objects of DMRG-style sweeps (merge, truncated split, environments).

A two-site tensor at bond ``k`` (0-based, between sites ``k`` and ``k+1``) is stored as one *merged core*
``Θ`` ``(r_{k-1}, m_k·m_{k+1}, n_k·n_{k+1}, r_{k+1})`` — the same layout as any core, so the chain with ``Θ`` in place of
the two cores (``d − 1`` cores) is itself a TT-matrix of the same ``W`` and runs through the same kernels and planner.
Pure functions; no ``torch.nn``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .svd import truncated_svd
from .tt import _absorb_left, _absorb_right, _merge_pair, check_cores, merge_cores, spectrum_entropy

__all__ = ["merge_two_site", "with_two_site", "split_two_site", "TwoSiteSplit", "local_grad_from_weight_grad",
           "move_centre", "canonical_error"]


def merge_two_site(cores: Sequence[torch.Tensor], bond: int) -> torch.Tensor:
    """``Θ`` at ``bond``: cores ``bond`` and ``bond+1`` contracted over their shared index,
    ``(r_{k-1}, m_k·m_{k+1}, n_k·n_{k+1}, r_{k+1})``. Differentiable."""
    _check_bond(len(cores), bond)
    return _merge_pair(cores[bond], cores[bond + 1])


def with_two_site(cores: Sequence[torch.Tensor], bond: int, theta: torch.Tensor) -> list[torch.Tensor]:
    """The ``d − 1`` cores of the same TT-matrix with ``theta`` standing for sites ``bond`` and ``bond+1``."""
    _check_bond(len(cores), bond)
    return [*cores[:bond], theta, *cores[bond + 2:]]


@dataclass(frozen=True)
class TwoSiteSplit:
    """Result of :func:`split_two_site`: the two new cores, the kept singular values, the discarded weight."""

    left: torch.Tensor  # (r_{k-1}, m_k, n_k, χ)
    right: torch.Tensor  # (χ, m_{k+1}, n_{k+1}, r_{k+1})
    singular_values: torch.Tensor  # (full rank,) every singular value of Θ, descending (entropy uses all of them)
    rank: int  # χ, the new bond dimension
    truncation_error: float  # ‖Θ − left·right‖_F / ‖Θ‖_F (0 when nothing was dropped)

    @property
    def entropy(self) -> float:
        """Entanglement entropy of the kept spectrum (the bond's entropy after the split)."""
        return float(spectrum_entropy(self.singular_values[:self.rank]))


def split_two_site(theta: torch.Tensor, site_shapes: tuple[tuple[int, int], tuple[int, int]], *,
                   max_rank: int | None = None, cutoff: float = 0.0, centre: str = "right") -> TwoSiteSplit:
    """Split a merged two-site core back into two cores by a truncated SVD ``Θ = U S Vᵀ``.

    ``site_shapes`` = ``((m_k, n_k), (m_{k+1}, n_{k+1}))``. Keeps at most ``max_rank`` singular values and drops those
    with ``s_i / s_1 ≤ cutoff`` (at least one is kept): the bond dimension follows the spectrum. ``centre="right"``
    (a left-to-right sweep) returns ``U`` (left-orthogonal) and ``S Vᵀ``; ``"left"`` returns ``U S`` and ``Vᵀ``
    (right-orthogonal). In a mixed-canonical chain the reported relative error is also the error of the whole ``W``.
    """
    if centre not in ("left", "right"):
        raise ValueError(f"centre={centre!r} is not allowed: expected 'left' or 'right'")
    if not (0.0 <= cutoff < 1.0):
        raise ValueError(f"cutoff={cutoff!r} is not allowed: expected a relative singular-value cutoff in [0, 1)")
    (m1, n1), (m2, n2) = site_shapes
    ra, mm, nn, rb = theta.shape
    if (mm, nn) != (m1 * m2, n1 * n2):
        raise ValueError(f"theta of modes ({mm}, {nn}) does not match site_shapes {site_shapes}")
    mat = theta.detach().reshape(ra, m1, m2, n1, n2, rb).permute(0, 1, 3, 2, 4, 5).reshape(ra * m1 * n1, m2 * n2 * rb)
    u, s, vh, _ = truncated_svd(mat)  # exact: the local matrix is small
    keep = int((s > cutoff * s[0]).sum()) if float(s[0]) > 0 else 1
    keep = max(1, min(keep, max_rank if max_rank is not None else keep))
    total = float((s.double() ** 2).sum())
    dropped = float((s[keep:].double() ** 2).sum())
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    u, sk, vh = u[:, :keep], s[:keep], vh[:keep]
    if centre == "right":
        left, right = u, sk[:, None] * vh
    else:
        left, right = u * sk, vh
    return TwoSiteSplit(left.reshape(ra, m1, n1, keep), right.reshape(keep, m2, n2, rb), s, keep, error)


def local_grad_from_weight_grad(cores: Sequence[torch.Tensor], site: int, weight_grad: torch.Tensor) -> torch.Tensor:
    """``∂L/∂G`` for the core ``G = cores[site]`` by environment contraction, from the dense gradient ``∂L/∂W``
    ``(∏m, ∏n)``. The chain may hold a merged two-site core (:func:`with_two_site`), so this serves one- and
    two-site sweeps alike.

    ``W`` is linear in ``G``: ``W = E_left · G · E_right`` with the environments the merged cores left and right of it,
    so ``∂L/∂G[a, m, n, c] = Σ E_left[(m_<), (n_<), a] ∂L/∂W[(m_< m m_>), (n_< n n_>)] E_right[c, (m_>), (n_>)]``. The
    manual counterpart of autograd (they agree to rounding); it forms ``∂L/∂W``, so it is meant for checking and for
    layers where that is cheap.
    """
    cores = check_cores(list(cores))
    if not isinstance(site, int) or not 0 <= site < len(cores):
        raise ValueError(f"site={site!r} is not allowed: a chain of {len(cores)} cores has sites 0 … {len(cores) - 1}")
    ref = cores[0]
    one = torch.ones(1, 1, 1, 1, dtype=ref.dtype, device=ref.device)
    left = merge_cores(cores[:site]) if site > 0 else one  # (1, M<, N<, a)
    right = merge_cores(cores[site + 1:]) if site + 1 < len(cores) else one  # (c, M>, N>, 1)
    a, m, n, c = cores[site].shape
    g = weight_grad.reshape(left.shape[1], m, right.shape[1], left.shape[2], n, right.shape[2])
    return torch.einsum("xipyjq,xya,cpq->aijc", g, left[0], right[..., 0])


def move_centre(core: torch.Tensor, neighbour: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """Move the orthogonality centre off ``core`` onto its ``neighbour`` (``direction="right"``: the next core,
    ``"left"``: the previous one) by an SVD, keeping every singular value (the one-site sweep's step: bonds fixed).
    Returns the orthogonal core, the neighbour with ``S·Vᵀ`` (or ``U·S``) absorbed, and the bond's singular values."""
    r_prev, m, n, r = core.shape
    if direction == "right":
        u, s, vh = torch.linalg.svd(core.reshape(r_prev * m * n, r), full_matrices=False)
        return u.reshape(r_prev, m, n, -1), _absorb_left(s[:, None] * vh, neighbour), s
    if direction == "left":
        u, s, vh = torch.linalg.svd(core.reshape(r_prev, m * n * r), full_matrices=False)
        return vh.reshape(-1, m, n, r), _absorb_right(neighbour, u * s), s
    raise ValueError(f"direction={direction!r} is not allowed: expected 'left' or 'right'")


def canonical_error(cores: Sequence[torch.Tensor], centre: int) -> float:
    """How far the chain is from mixed-canonical form with its orthogonality centre at site ``centre``: the largest
    ``‖QᵀQ − I‖`` over the left-orthogonal cores before it and the right-orthogonal cores after it (0 when exact)."""
    cores = check_cores(list(cores))
    worst = 0.0
    for k, g in enumerate(cores):
        if k == centre:
            continue
        r_prev, m, n, r = g.shape
        mat = g.reshape(r_prev * m * n, r) if k < centre else g.reshape(r_prev, m * n * r).T
        gram = mat.T @ mat
        worst = max(worst, float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                            device=gram.device))))
    return worst


def _check_bond(num_cores: int, bond: int) -> None:
    if not isinstance(bond, int) or not 0 <= bond < num_cores - 1:
        raise ValueError(f"bond={bond!r} is not allowed: a chain of {num_cores} cores has bonds 0 … {num_cores - 2}")
