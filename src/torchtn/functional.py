"""Stateless kernels the layers call, as ``nn.Linear`` calls ``torch.nn.functional.linear``.

Every function takes plain tensors (cores may be ``nn.Parameter``s), plans its contraction through the shared planner
(:mod:`torchtn.core.contraction`, plans cached per shapes, ranks, batch, dtype, device and grad mode) and is
differentiable with respect to every tensor argument.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .core.contraction import CostModel, MergedCache, get_strategy, tt_linear_apply
from .core.tt import check_cores

__all__ = ["mpo_linear"]


def mpo_linear(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *,
               contraction: str = "auto", cost_model: CostModel | None = None, autotune: bool | None = None,
               cache: MergedCache | None = None) -> torch.Tensor:
    """``y = x Wᵀ + b`` with ``W`` the TT-matrix of ``cores`` ``(r_{k-1}, m_k, n_k, r_k)``.

    Shape: ``(*, ∏n_k) -> (*, ∏m_k)``. ``contraction`` names a registered strategy (``"auto"``, ``"dense"``,
    ``"rtl"``, ``"ltr"``); ``cost_model`` prices plans (default: the device's); ``autotune`` measures the best
    candidates on the device (default: the global setting); ``cache`` memoizes plans and keeps merged cores between
    calls while the cores need no gradient.
    """
    if cache is None:  # a layer passes its own cache and has validated its cores and strategy already
        cores = check_cores(list(cores))
        get_strategy("tt_linear", contraction)
    return tt_linear_apply(x, cores, bias, contraction=contraction, cost_model=cost_model, autotune=autotune,
                           cache=cache)
