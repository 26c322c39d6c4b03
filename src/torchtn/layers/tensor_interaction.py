"""Tensor Interaction: channel mixing through the tensor product of a token with itself.

A bilinear map ``B: R^d × R^d → R^d`` factors through ``R^d ⊗ R^d`` (the universal property the Deep Tensor Network
paper builds on): ``y = 𝒲 · (x ⊗ x)`` with a 3-way weight. The default reading keeps that weight low-rank (CP):
``y = P [(U x) ⊙ (V x)]`` — ``O(d r)`` per token. The paper's own definition could not be read (``shared/spec/dtn.md``
marks it unverified); the alternative reading, ``mode="summary"``, mixes channels through a running second-order
data summary ``A_t = (1/t) Σ_{i≤t} (U x_i)(V x_i)ᵀ`` (``r × r``, causal): ``y_t = P (A_t (U x_t))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_choice, check_positive_int

__all__ = ["TensorInteraction", "InteractionState"]


@dataclass
class InteractionState:
    """Running sum of ``(U x_i)(V x_i)ᵀ`` and the token count (``mode="summary"``)."""

    A: torch.Tensor  # (batch, rank, rank)
    length: int = 0


class TensorInteraction(nn.Module):
    """``(batch, n, dim) -> (batch, n, dim)`` (or ``(batch, dim) -> (batch, dim)`` per token in ``"bilinear"``
    mode): a rank-``rank`` bilinear channel mixer; ``mode="summary"`` is the data-summary reading (causal)."""

    def __init__(self, dim: int, rank: int | None = None, *, mode: str = "bilinear", bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.rank = check_positive_int("rank", 2 * dim if rank is None else rank)
        self.mode = check_choice("mode", mode, ("bilinear", "summary"))
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Linear(dim, self.rank, bias=bias, **kw)
        self.V = nn.Linear(dim, self.rank, bias=bias, **kw)
        self.P = nn.Linear(self.rank, dim, bias=bias, **kw)

    def bilinear_weight(self) -> torch.Tensor:
        """The 3-way weight ``𝒲 (dim, dim, dim)`` of the bias-free map ``y_o = Σ_ab 𝒲[o, a, b] x_a x_b`` (checks)."""
        return torch.einsum("or,ra,rb->oab", self.P.weight, self.U.weight, self.V.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., dim={self.dim})")
        u, w = self.U(x), self.V(x)
        if self.mode == "bilinear":
            return self.P(u * w)
        if x.dim() != 3:
            raise ValueError(f"x has shape {tuple(x.shape)}; mode='summary' expects (batch, n, dim)")
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        # A_t u_t = (1/t) Σ_{i≤t} u_i (w_i · u_t): a causal linear attention of u on itself, values u, keys w
        scores = torch.tril(u @ w.transpose(1, 2))  # (t, i): w_i·u_t
        return self.P((scores @ u) / count)

    def step(self, x_t: torch.Tensor, state: InteractionState | None = None) -> tuple[torch.Tensor, InteractionState]:
        """One token ``(batch, dim)``; equals ``forward`` on the sequence."""
        u, w = self.U(x_t), self.V(x_t)
        if self.mode == "bilinear":
            return self.P(u * w), state
        A = u.unsqueeze(-1) * w.unsqueeze(-2) + (0 if state is None else state.A)
        t = 1 + (0 if state is None else state.length)
        return self.P((A @ u.unsqueeze(-1)).squeeze(-1) / t), InteractionState(A, t)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, mode={self.mode!r}"
