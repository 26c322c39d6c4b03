"""Any tensor of any module held as an MPO: a ``torch.nn.utils.parametrize`` parametrization over a TT-matrix.

For parameters that no drop-in layer can replace — ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (which it
reads directly, never through a submodule's ``forward``), a custom module's weight, a positional table —
:func:`mpo_parametrize` keeps the tensor as the cores of its TT-SVD; reading ``module.<name>`` rebuilds it (cached
while no gradient is needed). The dense tensor's memory is freed (an empty ``original``). The parametrization is a
registered layer, so the model is saved, loaded into a dense skeleton and inspected like any other.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import check_rel_tol
from .._modules import carry_over
from ..core.factorize import resolve_shapes
from ..core.tt import TTMatrix, inner_ranks
from .registry import register_layer
from .tt_layer import TTLayer

__all__ = ["MPOParametrization", "TensorSite", "mpo_parametrize", "attention_sites"]


@dataclass(frozen=True)
class TensorSite:
    """``owner.<tensor>``: a tensor that no drop-in layer can replace (``nn.MultiheadAttention``'s projections), as
    :func:`~torchtn.tensorize` converts it — through :class:`MPOParametrization`'s ``dense_matrix`` /
    ``tt_shapes_for`` / ``from_tt``, the converter methods every registered layer offers."""

    owner: nn.Module
    tensor: str

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.owner, self.tensor)


@register_layer("MPOParametrization")
class MPOParametrization(TTLayer):
    """``(original) -> (*shape)``: the tensor whose ``(shape[0], ∏shape[1:])`` matrix is the TT-matrix of the cores
    (modes ``out_shape ← in_shape``), ignoring the (empty) original it parametrizes."""

    def __init__(self, shape: Sequence[int], rank: int | Sequence[int] = 8, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 1 or min(self.shape) < 1:
            raise ValueError(f"shape={shape!r} is not allowed: expected positive sizes")
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        self.in_shape, self.out_shape = resolve_shapes(cols, rows, in_shape, out_shape)
        self._init_cores(TTMatrix.random(self.in_shape, self.out_shape, rank, variance=1.0 / (3.0 * cols),
                                         device=device, dtype=dtype))  # nn.Linear's variance for this fan-in

    def reset_parameters(self) -> None:
        """Gaussian cores with ``nn.Linear``'s variance ``1 / (3 · fan_in)``, ``fan_in = ∏shape[1:]``."""
        self._reset(math.prod(self.shape[1:]), None)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self._cached_dense(fresh=True).reshape(self.shape)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_empty(0)

    def layout(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "in_shape": list(self.in_shape), "out_shape": list(self.out_shape),
                "ranks": list(self.ranks)}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "MPOParametrization":
        return cls(spec["shape"], list(spec["ranks"])[1:-1] or 1, spec["in_shape"], spec["out_shape"], device=device,
                   dtype=dtype)

    # ------------------------------------------------------------------ converting a tensor (tensorize's protocol)
    @classmethod
    def dense_matrix(cls, site: TensorSite) -> torch.Tensor:
        """The tensor as the ``(shape[0], rest)`` matrix the cores hold."""
        value = site.value.detach()
        return value.reshape(value.shape[0], -1)

    @classmethod
    def tt_shapes_for(cls, site: TensorSite, in_shape: Sequence[int] | None = None,
                      out_shape: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows, cols = cls.dense_matrix(site).shape
        return resolve_shapes(cols, rows, in_shape, out_shape)

    @classmethod
    def from_tt(cls, site: TensorSite, tt: TTMatrix) -> "MPOParametrization":
        """Parametrize ``site`` by the TT-matrix ``tt`` (in place: ``site.owner.<tensor>`` reads it from now on)."""
        value = site.value
        layer = cls(tuple(value.shape), list(tt.ranks[1:-1]) or 1, tt.in_shape, tt.out_shape, device=value.device,
                    dtype=value.dtype)
        layer.set_cores(tt.cores)
        carry_over(layer, value).train(site.owner.training)  # (a frozen tensor's cores stay frozen)
        parametrize.register_parametrization(site.owner, site.tensor, layer, unsafe=True)
        return layer

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, modes={self.out_shape}←{self.in_shape}, ranks={self.ranks}, "
                f"compression={self.compression_ratio:.1f}x")


def mpo_parametrize(module: nn.Module, name: str = "weight", rank: int | Sequence[int] | None = None,
                    rel_tol: float | None = None, *, in_shape: Sequence[int] | None = None,
                    out_shape: Sequence[int] | None = None) -> MPOParametrization:
    """Hold ``module.<name>`` as an MPO from now on (in place; returns the parametrization): the TT-SVD of its
    current value viewed as a ``(shape[0], rest)`` matrix, truncated at ``rank`` (every bond, or one per bond) and/or
    ``rel_tol`` (relative Frobenius error; neither: exact). ``module.<name>`` then reads the rebuilt tensor, and the
    cores are ``module.parametrizations.<name>[0].cores`` — the parameters an optimizer trains.

    ``(original shape) -> (original shape)``; e.g. ``mpo_parametrize(mha, "in_proj_weight", rank=16)`` for the
    packed ``(3·embed_dim, embed_dim)`` projections of an ``nn.MultiheadAttention``.
    """
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        raise ValueError(f"name={name!r} is not allowed: {type(module).__name__} has no non-empty floating-point "
                         f"tensor called {name!r}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"name={name!r}: {type(module).__name__}.{name} is parametrized already")
    rel_tol = check_rel_tol("rel_tol", rel_tol)
    site = TensorSite(module, name)
    in_shape, out_shape = MPOParametrization.tt_shapes_for(site, in_shape, out_shape)
    max_rank = None if rank is None else inner_ranks(rank, in_shape, out_shape, name="rank")
    tt = TTMatrix.from_dense(MPOParametrization.dense_matrix(site), in_shape, out_shape, max_rank=max_rank,
                             rel_tol=rel_tol)
    return MPOParametrization.from_tt(site, tt)


def attention_sites(name: str, attention: nn.MultiheadAttention,
                    parametrized: bool = False) -> list[tuple[str, TensorSite]]:
    """The projection matrices of an ``nn.MultiheadAttention`` at ``name`` that are still plain tensors, by their
    full names: the packed ``in_proj_weight`` (or ``q/k/v_proj_weight`` when key and value sizes differ) and
    ``out_proj.weight`` — it reads all of them directly, so they are held as parametrizations. ``parametrized=True``:
    those a parametrization holds already instead."""
    prefix = f"{name}." if name else ""
    own = ["in_proj_weight"] if attention._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    sites = [(f"{prefix}{t}", TensorSite(attention, t)) for t in own]
    sites.append((f"{prefix}out_proj.weight", TensorSite(attention.out_proj, "weight")))
    if parametrized:
        return [(n, site) for n, site in sites if parametrize.is_parametrized(site.owner, site.tensor)]
    return [(n, site) for n, site in sites
            if not parametrize.is_parametrized(site.owner, site.tensor) and isinstance(site.value, torch.Tensor)]
