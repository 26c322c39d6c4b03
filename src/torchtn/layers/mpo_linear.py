"""``MPOLinear``: a drop-in ``nn.Linear`` whose weight is a matrix product operator (TT-matrix)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int, check_rel_tol
from .._modules import carry_over
from ..core.contraction import ContractionPlan, CostModel, get_strategy, plan_epoch
from ..core.factorize import resolve_shapes
from ..core.tt import TTMatrix, inner_ranks, tt_shapes
from ..functional import mpo_linear
from .registry import register_layer
from .tt_layer import TTLayer

__all__ = ["MPOLinear"]


@register_layer(converts=(nn.Linear,))
class MPOLinear(TTLayer):
    """Linear map ``y = x Wᵀ + b`` with ``W`` ``(out_features, in_features)`` held as an MPO / TT-matrix.

    Cores ``cores[k]`` have shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``∏ m_k = out_features`` (``out_shape``) and
    ``∏ n_k = in_features`` (``in_shape``). ``rank`` caps every inner bond (an int) or gives each (a sequence); ranks
    above the useful maximum ``min(∏_{l≤k} m_l n_l, ∏_{l>k} m_l n_l)`` are clipped. Shapes default to a balanced
    factorization into 4 modes (fewer when a size has fewer prime factors). ``bias``, ``device`` and ``dtype`` are
    keywords exactly as for ``nn.Linear``.

    Shape: ``(*, in_features) -> (*, out_features)``.

    ``forward`` is :func:`torchtn.functional.mpo_linear`: planned per (batch size, dtype, device, grad mode, ranks)
    and cached; ``contraction`` forces a strategy (``"dense"``: rebuild ``W``; ``"rtl"``/``"ltr"``: core by core)
    instead of ``"auto"``; ``cost_model`` prices plans for this layer (default: the device's); ``autotune`` measures the
best candidates on the device for this layer (``None``: follow ``torchtn.set_autotune`` / ``TORCHTN_AUTOTUNE``).
When the cores need no
    gradient (eval under ``torch.no_grad()``, or frozen cores), merged cores are cached and rebuilt only when the
    parameters change.

    ``weight`` is read-only: the reconstructed matrix, for code that reads ``.weight.shape/.dtype/.device`` or the
    values. Building it costs one contraction of all cores (``O(∏m·∏n·r)``); without gradients it is cached like the
    merged cores, and readers get a copy kept with it, so writing into it never changes the layer (an in-place write
    is reported at the next read). Assigning to it raises.
    """

    sweepable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | Sequence[int] = 8,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        bias: bool = True,
        *,
        contraction: str = "auto",
        cost_model: CostModel | None = None,
        autotune: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.in_shape, self.out_shape = resolve_shapes(self.in_features, self.out_features, in_shape, out_shape)
        if len(self.in_shape) == 1 and in_shape is None and out_shape is None and self.in_features * self.out_features > 1:
            warnings.warn(f"MPOLinear({in_features}, {out_features}): the sizes have no factors to pair into modes, so "
                          f"the MPO is one core — the dense matrix, no compression — and rank has no effect; give "
                          f"in_shape / out_shape (pad the features to a size with factors)", stacklevel=2)
        get_strategy("tt_linear", contraction)
        self.contraction = contraction
        if cost_model is not None and not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a torchtn.core.CostModel, got {type(cost_model).__name__}")
        self.cost_model = cost_model
        if autotune is not None and not isinstance(autotune, bool):
            raise TypeError(f"autotune={autotune!r} is not allowed: expected True, False or None (the global setting)")
        self.autotune = autotune
        ranks = (1, *inner_ranks(rank, self.in_shape, self.out_shape, name="rank"), 1)
        self._init_cores(TTMatrix([torch.empty(ranks[k], m, n, ranks[k + 1], device=device, dtype=dtype)
                                   for k, (m, n) in enumerate(zip(self.out_shape, self.in_shape))]))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Gaussian cores with ``Var(W_ij) = 1/(3·in_features)``, as ``nn.Linear``'s default init (see
        :func:`~torchtn.core.tt_init_std`); the bias is ``U(−1/√in, 1/√in)`` like ``nn.Linear``'s."""
        self._reset(self.in_features, self.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int | Sequence[int] | None = None, rel_tol: float | None = None,
                   in_shape: Sequence[int] | None = None, out_shape: Sequence[int] | None = None,
                   **kwargs) -> "MPOLinear":
        """Convert a trained ``nn.Linear`` by TT-SVD of its weight (``rank`` cap and/or ``rel_tol`` error bound).

        With neither, the decomposition is exact (full TT-rank). The bias is copied.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        rel_tol = check_rel_tol("rel_tol", rel_tol)
        in_shape, out_shape = cls.tt_shapes_for(linear, in_shape, out_shape)
        max_rank = None if rank is None else inner_ranks(rank, in_shape, out_shape, name="rank")
        tt = TTMatrix.from_dense(cls.dense_matrix(linear), in_shape, out_shape, max_rank=max_rank, rel_tol=rel_tol)
        return cls.from_tt(linear, tt, **kwargs)

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, **kwargs) -> "MPOLinear":
        """Build a layer holding copies of the given cores ``(r_{k-1}, m_k, n_k, r_k)`` and optional bias."""
        tt = TTMatrix(cores)
        ref = tt.cores[0]
        out_shape, in_shape = tt_shapes(tt.cores)
        layer = cls(math.prod(in_shape), math.prod(out_shape), tt.ranks[1:-1] or 1, in_shape, out_shape,
                    bias=bias is not None, device=ref.device, dtype=ref.dtype, **kwargs)
        with torch.no_grad():
            for p, g in zip(layer.cores, tt.cores):
                p.copy_(g)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same map (the inverse of :meth:`from_dense`)."""
        ref = self.cores[0]
        return self._dense_copy(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                          device=ref.device, dtype=ref.dtype))

    to_dense_module = to_linear

    # ------------------------------------------------------------------ registry protocol
    @staticmethod
    def dense_matrix(linear: nn.Linear) -> torch.Tensor:
        """The matrix a TT-matrix replaces: ``linear.weight`` ``(out_features, in_features)``."""
        return linear.weight.detach()

    @staticmethod
    def tt_shapes_for(linear: nn.Linear, in_shape: Sequence[int] | None = None,
                      out_shape: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in_shape, out_shape)`` for converting ``linear`` (given ones checked, missing ones suggested)."""
        return resolve_shapes(linear.in_features, linear.out_features, in_shape, out_shape)

    @classmethod
    def from_tt(cls, linear: nn.Linear, tt: TTMatrix, **kwargs) -> "MPOLinear":
        """The layer replacing ``linear``: weight ``tt`` (cast to ``linear``'s dtype), ``linear``'s bias."""
        ref = linear.weight
        bias = None if linear.bias is None else linear.bias.detach()
        return carry_over(cls.from_cores([c.to(device=ref.device, dtype=ref.dtype) for c in tt.cores], bias=bias,
                                          **kwargs), linear)

    def layout(self) -> dict[str, Any]:
        """What a model file records to rebuild this layer empty (shapes, ranks, bias, contraction)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "ranks": list(self.ranks), "bias": self.bias is not None,
                "contraction": self.contraction}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "MPOLinear":
        in_shape, out_shape, ranks = spec["in_shape"], spec["out_shape"], spec["ranks"]
        layer = cls(spec.get("in_features", math.prod(in_shape)), spec.get("out_features", math.prod(out_shape)),
                    list(ranks[1:-1]) or 1, in_shape, out_shape, bias=bool(spec["bias"]),
                    contraction=spec.get("contraction", "auto"), device=device, dtype=dtype)
        if list(layer.ranks) != list(ranks):
            raise ValueError(f"recorded ranks {list(ranks)} are not valid for modes {out_shape}←{in_shape} "
                             f"(they would be {list(layer.ranks)})")
        return layer

    # ------------------------------------------------------------------ forward
    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed weight ``(out_features, in_features)`` (read-only; see the class docstring for its cost)."""
        return self._cached_dense(for_readers=True)

    def plan(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             needs_grad: bool | None = None, input_grad: bool = False) -> ContractionPlan:
        """The (cached) contraction plan for a batch of ``batch_size`` rows; print it to see what runs.

        ``needs_grad``: plan for training (default: whether the cores need gradients now); ``input_grad``: the
        input needs a gradient too (a hidden layer; the first layer's input does not).
        """
        batch_size = check_positive_int("batch_size", batch_size)
        if needs_grad is None:
            needs_grad = torch.is_grad_enabled() and any([p.requires_grad for p in self.cores])
        return self.tt.plan(batch_size, dtype=dtype, device=device, needs_grad=needs_grad, input_grad=input_grad,
                            contraction=self.contraction, cache_merged=not needs_grad, cost_model=self.cost_model,
                            autotune=self.autotune)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        # an inference call like the last one: straight to the kept matrices, reading as few objects as possible
        # (the registries' dicts, not nn.Module.__getattr__; see MergedCache.repeat)
        bias = self._parameters.get("bias")
        if not torch.is_grad_enabled():
            y = self._merged.repeat(x, self._modules["cores"]._parameters.values(), bias,
                                    (self.contraction, self.cost_model, self.autotune, plan_epoch()))
            if y is not None:
                return y
        return mpo_linear(x, self.core_list(), bias, contraction=self.contraction, cost_model=self.cost_model,
                          autotune=self.autotune, cache=self._merged)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}, "
            f"compression={self.compression_ratio:.1f}x"
        )
