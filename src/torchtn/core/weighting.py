"""Data-aware truncation: TT-SVD in the norm that measures a layer's output error on data.

A layer ``y = W x`` (``W`` ``(M, N)``) whose inputs ``x`` have the second moment ``G = E[x xᵀ] = L Lᵀ`` has output
error ``E ‖(W − Ŵ) x‖² = ‖(W − Ŵ) L‖²_F``; a table whose row ``t`` is looked up with frequency ``p_t`` (an embedding)
has error ``Σ_t p_t ‖W_t − Ŵ_t‖² = ‖diag(√p) (W − Ŵ)‖²_F``. If the outputs feed the rest of a network whose
sensitivity to them is ``E[g gᵀ] = R Rᵀ`` (``g``: the gradient of a random projection of the model's output with
respect to the layer's output), the error that reaches the model's output is, to first order and with inputs and
gradients taken as independent (the Kronecker factorization of K-FAC), ``‖Rᵀ (W − Ŵ) L‖²_F`` — and a table's
``‖diag(√p) (W − Ŵ) R‖²_F``: the output side of a table is its columns. Every case is a Frobenius norm of
``S (W − Ŵ) L`` with ``S``, ``L`` invertible, so the best approximation in it is ``Ŵ = S⁻¹ · T(S W L) · L⁻¹`` with
``T`` the Frobenius-optimal truncation (Eckart–Young for two cores; TT-SVD's quasi-optimal one for more). ``S⁻¹`` and
``L⁻¹`` fold into the cores exactly when the rows live on the first core (``out_shape = (M, 1, …)``) and the columns
on the last (``in_shape = (…, 1, N)``) — the two-core layout :func:`two_core_shapes`, a low-rank factorization
``W ≈ A B`` held as an MPO. Activation-aware low-rank compression of pretrained transformers (e.g. ASVD, SVD-LLM)
rests on the same identity; the output side makes every layer's error one quantity (the model output's), so one
budget can be shared by all layers' spectra in absolute terms.
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


def _cholesky(gram: torch.Tensor, name: str, ridge: float) -> torch.Tensor:
    """Lower-triangular ``L`` with ``gram + ε·I = L Lᵀ``; ``ε`` (``ridge`` relative to the mean diagonal, raised
    until the factorization succeeds) keeps ``L`` invertible for directions the data never visited."""
    g = gram.detach().double()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{name} has shape {tuple(g.shape)}: expected a square matrix")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    scale = float(g.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(g + ridge * 10**attempt * scale * eye)
        if int(info) == 0:
            return factor
    raise ValueError(f"{name} is not positive semi-definite: cannot factor it")


@dataclass(frozen=True)
class Weighting:
    """The norm ``‖S · X · L‖_F`` on ``(M, N)`` matrices, ``S = diag(row_weights)`` or ``S = Rᵀ``
    (``row_factor``), ``L = col_factor`` (any of them may be absent).

    ``row_weights`` ``(M,)`` positive; ``row_factor`` ``(M, M)`` and ``col_factor`` ``(N, N)`` lower-triangular.
    Build one from data with :meth:`from_stats`; :meth:`apply` maps ``W`` into the weighted space, where an ordinary
    TT-SVD (and its rounding, spectra and rank allocation) is optimal for the weighted error; :meth:`undo` maps the
    cores back.
    """

    row_weights: torch.Tensor | None = None
    col_factor: torch.Tensor | None = None
    row_factor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.row_weights is not None and self.row_factor is not None:
            raise ValueError("a Weighting has row_weights or a row_factor, not both")

    @classmethod
    def from_stats(cls, *, input_gram: torch.Tensor | None = None, row_counts: torch.Tensor | None = None,
                   output_gram: torch.Tensor | None = None, ridge: float = 1e-6,
                   smoothing: float = 1.0) -> "Weighting":
        """From what a layer saw: a linear map's input second moment ``E[x xᵀ]`` ``(N, N)`` and/or a table's row
        counts ``(M,)`` (how often each row was looked up; normalized here to frequencies), and optionally the
        second moment of the output gradients ``E[g gᵀ]`` (the rows' side of a linear map ``(M, M)``; the columns'
        side ``(N, N)`` of a table, given with ``row_counts``). ``ridge`` (relative to each matrix's mean diagonal)
        keeps the factors invertible for directions the data never visited; ``smoothing`` is added to every count
        (add-one smoothing: rows never seen still weigh a little, so the truncation does not treat them as free)."""
        if input_gram is not None and row_counts is not None and output_gram is not None:
            raise ValueError("output_gram goes with input_gram (a linear map) or with row_counts (a table), not both")
        col = None if input_gram is None else _cholesky(input_gram, "input_gram", ridge)
        row = None
        if output_gram is not None:
            factor = _cholesky(output_gram, "output_gram", ridge)
            if row_counts is not None:
                col = factor  # a table's outputs are its rows: their sensitivity weighs its columns
            else:
                row = factor
        weights = None
        if row_counts is not None:
            c = row_counts.detach().double()
            if c.dim() != 1 or bool((c < 0).any()):
                raise ValueError("row_counts must be a 1-D tensor of counts >= 0")
            if smoothing <= 0:
                raise ValueError(f"smoothing={smoothing!r} is not allowed: expected a number > 0")
            weights = ((c + smoothing) / (c + smoothing).sum()).sqrt()
        return cls(weights, col, row)

    def rows(self, index: torch.Tensor) -> "Weighting":
        """The same norm on the sub-matrix of rows ``index`` (diagonal row weights only: a full row factor couples
        the rows). The weights keep their values, so errors stay in the units of the whole matrix's."""
        if self.row_factor is not None:
            raise ValueError("a Weighting with a full row_factor cannot be restricted to some rows")
        weights = None if self.row_weights is None else self.row_weights[index.to(self.row_weights.device)]
        return Weighting(weights, self.col_factor, None)

    def check(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless the weights fold into cores of these modes (rows on the first core, columns
        on the last; see :func:`two_core_shapes`) and match their sizes."""
        rows, cols = math.prod(out_shape), math.prod(in_shape)
        row_side = self.row_weights if self.row_weights is not None else self.row_factor
        if row_side is not None:
            if any(m != 1 for m in out_shape[1:]):
                raise ValueError(f"row weights need every row mode on the first core: out_shape={tuple(out_shape)} "
                                 f"has more (use {two_core_shapes(rows, cols)[1]})")
            if len(row_side) != rows:
                raise ValueError(f"row weights of size {len(row_side)} for a matrix of {rows} rows")
        if self.col_factor is not None:
            if any(n != 1 for n in in_shape[:-1]):
                raise ValueError(f"column weights need every column mode on the last core: "
                                 f"in_shape={tuple(in_shape)} has more (use {two_core_shapes(rows, cols)[0]})")
            if len(self.col_factor) != cols:
                raise ValueError(f"column weights of size {len(self.col_factor)} for a matrix of {cols} columns")

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``S W L`` ``(M, N)`` in float64 (truncate it there; :meth:`undo` keeps the cores' dtype)."""
        w = matrix.detach().double()
        if self.row_weights is not None:
            w = self.row_weights.to(w.device)[:, None] * w
        if self.row_factor is not None:
            w = self.row_factor.to(w.device).T @ w
        if self.col_factor is not None:
            w = w @ self.col_factor.to(w.device)
        return w

    def error(self, matrix: torch.Tensor, approx: torch.Tensor) -> float:
        """Relative weighted error ``‖S (W − Ŵ) L‖ / ‖S W L‖``."""
        w = matrix.detach().double()
        return float(torch.linalg.vector_norm(self.apply(w - approx.detach().double()))
                     / torch.linalg.vector_norm(self.apply(w)).clamp_min(1e-300))

    def undo(self, tt: TTMatrix) -> TTMatrix:
        """The cores of ``S⁻¹ T L⁻¹`` for a TT-matrix ``T`` of the weighted matrix (same ranks, modes and dtype), in
        the balanced gauge (:meth:`TTMatrix.balanced`): ``S⁻¹`` and ``L⁻¹`` can scale one core by orders of
        magnitude against the other (rare tokens' rows by ``1/√p``), which made healing by Adam diverge."""
        self.check(tt.in_shape, tt.out_shape)
        cores = list(tt.cores)
        first = cores[0]  # (1, M, n_1, r_1)
        if self.row_weights is not None:  # divide row i by w_i
            cores[0] = (first.double() / self.row_weights.to(first.device)[None, :, None, None]).to(first.dtype)
        if self.row_factor is not None:  # X ↦ R⁻ᵀ X by a triangular solve (no inverse)
            _, m, n, r = first.shape
            flat = first.double().reshape(m, n * r)
            solved = torch.linalg.solve_triangular(self.row_factor.to(first.device).T, flat, upper=True)
            cores[0] = solved.reshape(1, m, n, r).to(first.dtype)
        if self.col_factor is not None:  # last core (r, m_d, N, 1): X ↦ X L⁻¹ by a triangular solve
            last = cores[-1]
            r, m, n, _ = last.shape
            flat = last.double().reshape(r * m, n)
            solved = torch.linalg.solve_triangular(self.col_factor.to(last.device), flat, upper=False, left=False)
            cores[-1] = solved.reshape(r, m, n, 1).to(last.dtype)
        return TTMatrix(cores).balanced()
