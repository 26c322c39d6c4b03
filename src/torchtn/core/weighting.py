"""Data-aware truncation: TT-SVD in the norm that measures a layer's output error on data.

A layer ``y = W x`` (``W`` ``(M, N)``) whose inputs ``x`` have the Gram matrix ``G = Σ x xᵀ = L Lᵀ`` has output
error ``Σ ‖(W − Ŵ) x‖² = ‖(W − Ŵ) L‖²_F``; a table looked up row ``t`` with frequency ``c_t`` (an embedding) has
error ``Σ_t c_t ‖W_t − Ŵ_t‖² = ‖diag(√c) (W − Ŵ)‖²_F``. Both are Frobenius norms of ``D (W − Ŵ) L`` with ``D``, ``L``
invertible, so the best approximation in them is ``Ŵ = D⁻¹ · T(D W L) · L⁻¹`` with ``T`` the Frobenius-optimal
truncation (Eckart–Young for two cores; TT-SVD's quasi-optimal one for more). ``D⁻¹`` and ``L⁻¹`` fold into the cores
exactly when the rows live on the first core (``out_shape = (M, 1, …)``) and the columns on the last
(``in_shape = (…, 1, N)``) — the two-core layout :func:`two_core_shapes`, a low-rank factorization ``W ≈ A B`` held
as an MPO. Activation-aware low-rank compression of pretrained transformers (e.g. ASVD, SVD-LLM) rests on the
same identity.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tt import TTMatrix

__all__ = ["Weighting", "two_core_shapes"]


def two_core_shapes(rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(in_shape, out_shape)`` of the two-core MPO ``W (rows, cols) = A (rows, r) · B (r, cols)``:
    ``((1, cols), (rows, 1))`` — rows on the first core, columns on the last."""
    return (1, cols), (rows, 1)


@dataclass(frozen=True)
class Weighting:
    """The norm ``‖diag(row_weights) · X · gram_factor‖_F`` on ``(M, N)`` matrices (either factor may be absent).

    ``row_weights`` ``(M,)`` positive; ``gram_factor`` ``(N, N)`` lower-triangular ``L`` with ``G = L Lᵀ``. Build one
    from data with :meth:`from_stats`; :meth:`apply` maps ``W`` into the weighted space, where an ordinary TT-SVD (and
    its rounding, spectra and rank allocation) is optimal for the weighted error; :meth:`undo` maps the cores back.
    """

    row_weights: torch.Tensor | None = None
    gram_factor: torch.Tensor | None = None

    @classmethod
    def from_stats(cls, *, input_gram: torch.Tensor | None = None, row_counts: torch.Tensor | None = None,
                   ridge: float = 1e-6, smoothing: float = 1.0) -> "Weighting":
        """From an input Gram matrix ``Σ x xᵀ`` ``(N, N)`` (a linear map's inputs) and/or row counts ``(M,)`` (how
        often each row of a table was looked up). ``ridge`` (relative to the Gram's mean diagonal) keeps ``L``
        invertible for directions the data never visited; ``smoothing`` is added to every count (add-one smoothing:
        rows never seen still weigh a little, so the truncation does not treat them as free)."""
        factor = None
        if input_gram is not None:
            g = input_gram.detach().double()
            if g.dim() != 2 or g.shape[0] != g.shape[1]:
                raise ValueError(f"input_gram has shape {tuple(g.shape)}: expected a square (N, N) matrix")
            if not bool(torch.isfinite(g).all()):
                raise ValueError("input_gram contains NaN or infinite values")
            scale = float(g.diagonal().mean().clamp_min(1e-300))
            eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
            for attempt in range(8):  # raise the ridge until the factorization succeeds (rank-deficient data)
                factor, info = torch.linalg.cholesky_ex(g + ridge * 10**attempt * scale * eye)
                if int(info) == 0:
                    break
            else:
                raise ValueError("input_gram is not positive semi-definite: cannot factor it")
        weights = None
        if row_counts is not None:
            c = row_counts.detach().double()
            if c.dim() != 1 or bool((c < 0).any()):
                raise ValueError("row_counts must be a 1-D tensor of counts >= 0")
            if smoothing <= 0:
                raise ValueError(f"smoothing={smoothing!r} is not allowed: expected a number > 0")
            weights = (c + smoothing).sqrt()
        return cls(weights, factor)

    def check(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless the weights fold into cores of these modes (rows on the first core, columns
        on the last; see :func:`two_core_shapes`) and match their sizes."""
        rows, cols = math.prod(out_shape), math.prod(in_shape)
        if self.row_weights is not None:
            if any(m != 1 for m in out_shape[1:]):
                raise ValueError(f"row weights need every row mode on the first core: out_shape={tuple(out_shape)} "
                                 f"has more (use {two_core_shapes(rows, cols)[1]})")
            if len(self.row_weights) != rows:
                raise ValueError(f"{len(self.row_weights)} row weights for a matrix of {rows} rows")
        if self.gram_factor is not None:
            if any(n != 1 for n in in_shape[:-1]):
                raise ValueError(f"an input Gram needs every column mode on the last core: in_shape={tuple(in_shape)} "
                                 f"has more (use {two_core_shapes(rows, cols)[0]})")
            if len(self.gram_factor) != cols:
                raise ValueError(f"an input Gram of size {len(self.gram_factor)} for a matrix of {cols} columns")

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``D W L`` ``(M, N)`` in float64 (truncate it there; :meth:`undo` keeps the cores' dtype)."""
        w = matrix.detach().double()
        if self.row_weights is not None:
            w = self.row_weights.to(w.device)[:, None] * w
        if self.gram_factor is not None:
            w = w @ self.gram_factor.to(w.device)
        return w

    def error(self, matrix: torch.Tensor, approx: torch.Tensor) -> float:
        """Relative weighted error ``‖D (W − Ŵ) L‖ / ‖D W L‖``."""
        w = matrix.detach().double()
        return float(torch.linalg.vector_norm(self.apply(w - approx.detach().double()))
                     / torch.linalg.vector_norm(self.apply(w)).clamp_min(1e-300))

    def undo(self, tt: TTMatrix) -> TTMatrix:
        """The cores of ``D⁻¹ T L⁻¹`` for a TT-matrix ``T`` of the weighted matrix (same ranks, modes and dtype)."""
        self.check(tt.in_shape, tt.out_shape)
        cores = list(tt.cores)
        if self.row_weights is not None:  # first core (1, M, n_1, r_1): divide row i by w_i
            first = cores[0]
            cores[0] = (first.double() / self.row_weights.to(first.device)[None, :, None, None]).to(first.dtype)
        if self.gram_factor is not None:  # last core (r, m_d, N, 1): X ↦ X L⁻¹ by a triangular solve (no inverse)
            last = cores[-1]
            r, m, n, _ = last.shape
            flat = last.double().reshape(r * m, n)
            solved = torch.linalg.solve_triangular(self.gram_factor.to(last.device), flat, upper=False, left=False)
            cores[-1] = solved.reshape(r, m, n, 1).to(last.dtype)
        return TTMatrix(cores)

