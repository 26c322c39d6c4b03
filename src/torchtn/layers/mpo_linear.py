"""``MPOLinear``: a drop-in ``nn.Linear`` whose weight is a matrix product operator (TT-matrix)."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_rel_tol
from ..core import (
    BondInfo,
    ContractionPlan,
    bond_report,
    bond_spectra,
    entanglement_entropy,
    inner_ranks,
    plan_tt_linear,
    prepare_groups,
    resolve_shapes,
    tt_linear,
    tt_num_params,
    tt_ranks,
    tt_svd,
    tt_to_dense,
)

__all__ = ["MPOLinear"]

_CONTRACTIONS = ("auto", "dense", "rtl", "ltr")
_MAX_PLANS = 64


class MPOLinear(nn.Module):
    """Linear map ``y = x Wᵀ + b`` with ``W`` ``(out_features, in_features)`` held as an MPO / TT-matrix.

    Cores ``cores[k]`` have shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``∏ m_k = out_features`` (``out_shape``) and
    ``∏ n_k = in_features`` (``in_shape``). ``rank`` caps every inner bond (an int) or gives each (a sequence); ranks
    above the useful maximum ``min(∏_{l≤k} m_l n_l, ∏_{l>k} m_l n_l)`` are clipped. Shapes default to a balanced
    factorization into 4 modes (fewer when a size has fewer prime factors).

    Shape: ``(*, in_features) -> (*, out_features)``.

    The forward pass is planned per (batch size, dtype, device, whether the cores need gradients) by
    :func:`torchtn.core.plan_tt_linear` and the plan is cached; ``contraction`` forces ``"dense"`` (rebuild ``W``),
    ``"rtl"``/``"ltr"`` (core by core) instead of ``"auto"``. When the cores need no gradient (``eval`` under
    ``torch.no_grad()``, or frozen cores) merged cores are cached and rebuilt only when the parameters change.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | Sequence[int],
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        bias: bool = True,
        *,
        contraction: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.in_shape, self.out_shape = resolve_shapes(self.in_features, self.out_features, in_shape, out_shape)
        self.contraction = check_choice("contraction", contraction, _CONTRACTIONS)
        ranks = (1, *inner_ranks(rank, self.in_shape, self.out_shape, name="rank"), 1)
        factory = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], m, n, ranks[k + 1], **factory))
            for k, (m, n) in enumerate(zip(self.out_shape, self.in_shape))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self._plans: OrderedDict[tuple, ContractionPlan] = OrderedDict()
        self._merged: tuple[tuple, list[torch.Tensor]] | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Gaussian cores scaled so that ``Var(W_ij) = 1/(3·in_features)``, as for ``nn.Linear``'s default init.

        With i.i.d. zero-mean cores, ``Var(W_ij) = ∏_k σ_k² · ∏_k r_k`` (one term per bond path), so each core gets
        ``σ² = (1/(3·in_features) / ∏ r_k)^{1/d}``. The bias is ``U(−1/√in, 1/√in)`` like ``nn.Linear``.
        """
        ranks = self.ranks
        d = len(self.cores)
        target = 1.0 / (3.0 * self.in_features)
        std = math.sqrt((target / math.prod(ranks[1:-1])) ** (1.0 / d))
        with torch.no_grad():
            for g in self.cores:
                g.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: int | Sequence[int] | None = None,
        rel_tol: float | None = None,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        **kwargs,
    ) -> "MPOLinear":
        """Convert a trained ``nn.Linear`` by TT-SVD of its weight (``rank`` cap and/or ``rel_tol`` error bound).

        With neither, the decomposition is exact (full TT-rank). The bias is copied.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        rel_tol = check_rel_tol("rel_tol", rel_tol)
        in_shape, out_shape = resolve_shapes(linear.in_features, linear.out_features, in_shape, out_shape)
        max_rank = None if rank is None else inner_ranks(rank, in_shape, out_shape, name="rank")
        weight = linear.weight.detach()
        cores = tt_svd(weight, in_shape, out_shape, max_rank=max_rank, rel_tol=rel_tol)
        return cls.from_cores(cores, bias=None if linear.bias is None else linear.bias.detach(), **kwargs)

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, **kwargs) -> "MPOLinear":
        """Build a layer holding copies of the given cores ``(r_{k-1}, m_k, n_k, r_k)`` and optional bias."""
        out_shape = tuple(int(g.shape[1]) for g in cores)
        in_shape = tuple(int(g.shape[2]) for g in cores)
        ref = cores[0]
        layer = cls(math.prod(in_shape), math.prod(out_shape), tt_ranks(cores)[1:-1] or 1, in_shape, out_shape,
                    bias=bias is not None, device=ref.device, dtype=ref.dtype, **kwargs)
        with torch.no_grad():
            for p, g in zip(layer.cores, cores):
                p.copy_(g)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------------ properties
    @property
    def ranks(self) -> tuple[int, ...]:
        """Bond dimensions ``(1, r_1, …, r_{d-1}, 1)``."""
        return tt_ranks(list(self.cores))

    @property
    def num_weight_params(self) -> int:
        """Entries in the cores (bias excluded)."""
        return tt_num_params(self.in_shape, self.out_shape, self.ranks)

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries / core entries (≥ 1 means smaller than ``nn.Linear``; bias excluded from both)."""
        return self.in_features * self.out_features / self.num_weight_params

    def to_dense(self) -> torch.Tensor:
        """The weight ``(out_features, in_features)``; differentiable."""
        return tt_to_dense(list(self.cores))

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same map."""
        p = self.cores[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def bond_spectra(self) -> list[torch.Tensor]:
        """Singular values across each inner bond (from a canonical form; ``W`` is never formed)."""
        return bond_spectra(list(self.cores))

    def entanglement_entropy(self) -> torch.Tensor:
        """Entanglement entropy of the weight at each inner bond, ``(d−1,)`` float64 (natural log)."""
        return entanglement_entropy(list(self.cores))

    def bond_report(self) -> list[BondInfo]:
        """Per inner bond: rank, entanglement entropy, error that the next smaller rank would cause."""
        return bond_report(list(self.cores))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}, "
            f"compression={self.compression_ratio:.1f}x"
        )

    # ------------------------------------------------------------------ forward
    def _needs_core_grad(self) -> bool:
        return torch.is_grad_enabled() and any([p.requires_grad for p in self.cores])

    def plan(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             needs_grad: bool | None = None) -> ContractionPlan:
        """The (cached) contraction plan for a batch of ``batch_size`` rows; print it to see what runs."""
        batch_size = check_positive_int("batch_size", batch_size)
        ref = self.cores[0]
        dtype = ref.dtype if dtype is None else dtype
        device = ref.device if device is None else device
        needs_grad = self._needs_core_grad() if needs_grad is None else needs_grad
        key = (batch_size, dtype, device, needs_grad, self.contraction)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_tt_linear(
                self.in_shape, self.out_shape, self.ranks, batch_size, cache_merged=not needs_grad,
                itemsize=dtype.itemsize,
                force=None if self.contraction == "auto" else self.contraction, training=needs_grad,
            )
            self._plans[key] = plan
            if len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _group_matrices(self, plan: ContractionPlan) -> list[torch.Tensor]:
        cores = list(self.cores)
        if not plan.cache_merged or torch.compiler.is_compiling():
            return prepare_groups(cores, plan)
        key = (plan.groups, plan.direction) + tuple((p.data_ptr(), p._version, p.dtype) for p in cores)
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, prepare_groups(cores, plan))
        return self._merged[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        batch = x2.shape[0]
        if batch == 0:
            return x.new_zeros(*lead, self.out_features)
        plan = self.plan(batch, x2.dtype, x2.device)
        mats = self._group_matrices(plan)
        if plan.is_dense:
            y = F.linear(x2, mats[0], self.bias)
        else:
            y = tt_linear(x2, mats, plan)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.double() invalidate cached merges
        self._merged = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles never carry the cache
        state = self.__dict__.copy()
        state["_merged"] = None
        return state
