"""``TTLayer``: the base of every layer whose weight is one TT-matrix (MPO).

It holds the cores as plain ``nn.Parameter``s (``cores.0 … cores.{d-1}`` in the ``state_dict``) and owns the layer-side
state that follows them: the merged-core cache used in inference and the rank bookkeeping. The math is
:class:`~torchtn.core.TTMatrix`'s (``layer.tt``); a bond whose rank changes goes through :meth:`set_cores`, the one
place that swaps parameters and drops caches (plans are keyed on the ranks, so they can never be stale).
``load_state_dict`` takes the bond dimensions of the cores it is given (a state saved after a sweep changed them
loads into a freshly built layer of the same modes).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .._modules import carry_over, holding
from ..core._tracing import kept, traced
from ..core.contraction import MergedCache
from ..core.tt import BondInfo, TTMatrix, check_cores, tt_ranks
from .computed_weight import ComputedWeight, WeightCache

__all__ = ["TTLayer"]


_NAMES = [str(k) for k in range(64)]  # a ParameterList's names of its first entries, in order


def _names(n: int) -> list[str]:
    return _NAMES[:n] if n <= len(_NAMES) else [str(k) for k in range(n)]


def _held_cores(holder: nn.ParameterList) -> list[torch.Tensor]:
    """``holder``'s entries by index, after its forward pre-hooks ran (what calling it would do first)."""
    for hook_id, hook in list(holder._forward_pre_hooks.items()):
        if hook_id in holder._forward_pre_hooks_with_kwargs:
            hook(holder, (), {})
        else:
            hook(holder, ())
    return [holder[k] for k in range(len(holder))]


class TTLayer(ComputedWeight):
    """A module whose weight is the TT-matrix ``self.tt`` built from ``self.cores`` (read-only ``weight``)."""

    weight_source = "its MPO cores"

    cores: nn.ParameterList
    #: whether ``forward`` runs on any chain of cores of the same matrix (modes of neighbouring sites merged), which
    #: sweep training needs (:meth:`cores_override` with a two-site tensor)
    sweepable: bool = False

    def _init_cores(self, shapes_ranks: TTMatrix) -> None:
        self.cores = nn.ParameterList(nn.Parameter(c.contiguous()) for c in shapes_ranks.cores)
        self._merged = MergedCache()
        self._dense_cache = WeightCache()

    def core_list(self) -> list[torch.Tensor]:
        """The cores as a list, in chain order. Inside :meth:`cores_override`, the override.

        Read straight from the ``ParameterList``'s registry (iterating it by index costs ~5 µs per core, which
        dominates small forward calls) while it holds plain parameters named ``0 … d−1`` in that order; otherwise —
        a core pruned by ``torch.nn.utils.prune`` or parametrized by ``torch.nn.utils.parametrize``, or put back by
        ``prune.remove`` (which re-registers it last) — by index, after running the list's forward pre-hooks as a
        call of it would (pruning masks are applied by such a hook; the list itself is never called)."""
        override = self.__dict__.get("_core_override")
        if override is not None:
            return list(override)
        holder = self._modules["cores"]  # not self.cores: nn.Module.__getattr__ costs ~1 µs
        params = holder._parameters
        if not holder._forward_pre_hooks and type(holder) is nn.ParameterList and list(params) == _names(len(holder)):
            return list(params.values())
        return _held_cores(holder)

    def _plain_cores(self, doing: str) -> list[nn.Parameter]:
        """The core parameters themselves, for code that writes into them or replaces them (``doing``); a clear
        error while another mechanism holds one (pruning, a parametrization): a write would miss what it computes."""
        holder = self._modules["cores"]
        held = [str(k) for k in range(len(holder)) if not isinstance(holder._parameters.get(str(k)), nn.Parameter)]
        if held or holder._forward_pre_hooks:
            what = f"cores.{held[0]}" if held else "the cores' ParameterList"
            raise RuntimeError(f"{type(self).__name__} cannot be {doing}: {what} is held by torch.nn.utils.prune or a "
                               f"parametrization; make the pruning permanent first (prune.remove(layer.cores, "
                               f"name)) or remove the parametrization (parametrize.remove_parametrizations)")
        return self.core_list()

    @contextmanager
    def cores_override(self, cores: Sequence[torch.Tensor]) -> Iterator[None]:
        """Run ``forward`` on other cores of the same matrix for the duration of the block (e.g. a chain with a
        two-site tensor in place of two cores, whose gradient a sweep needs); only for ``sweepable`` layers."""
        if not self.sweepable:
            raise TypeError(f"{type(self).__name__} cannot run on overridden cores (not sweepable)")
        new = TTMatrix(check_cores(list(cores)))
        if new.shape != self.tt.shape:
            raise ValueError(f"override cores make a {new.shape} matrix, the layer's is {self.tt.shape}")
        self.__dict__["_core_override"] = new.cores
        try:
            yield
        finally:
            self.__dict__["_core_override"] = None

    def _reset(self, fan_in: int, bias: torch.Tensor | None) -> None:
        """PyTorch's default init for a layer of this fan-in: cores with ``Var(W_ij) = 1/(3·fan_in)`` (see
        :func:`~torchtn.core.tt_init_std`), bias ``U(−1/√fan_in, 1/√fan_in)``."""
        self._reset_cores(1.0 / (3.0 * fan_in))
        if bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                bias.uniform_(-bound, bound)

    def _reset_cores(self, variance: float) -> None:
        """Fresh Gaussian cores (the global RNG) whose dense matrix has entries of variance ``variance``."""
        ref = self.cores[0]
        fresh = TTMatrix.random(self.tt.in_shape, self.tt.out_shape, self.ranks, variance=variance,
                                device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for p, c in zip(self._plain_cores("reset"), fresh.cores):
                p.copy_(c)

    def to_dense_module(self) -> nn.Module:
        """The plain PyTorch module computing the same map (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``), e.g. to
        export a model that loads without torchtn."""
        raise NotImplementedError(f"{type(self).__name__} has no dense counterpart")

    def _dense_copy(self, module: nn.Module) -> nn.Module:
        """``module`` (a fresh dense layer of the same geometry) holding this layer's weight and bias, frozen and in
        the mode where this layer is."""
        return carry_over(holding(module, self.to_dense(), getattr(self, "bias", None)), self)

    # ------------------------------------------------------------------ the TT-matrix
    @property
    def tt(self) -> TTMatrix:
        """The weight as a :class:`~torchtn.core.TTMatrix` over the current cores (shared, not copied)."""
        return TTMatrix(self.core_list())

    @property
    def ranks(self) -> tuple[int, ...]:
        """Bond dimensions ``(1, r_1, …, r_{d-1}, 1)``."""
        return tt_ranks(self.core_list())

    @property
    def num_weight_params(self) -> int:
        """Entries in the cores (bias excluded)."""
        return self.tt.num_params

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries / core entries (≥ 1 means smaller; bias excluded from both)."""
        return self.tt.compression_ratio

    def to_dense(self) -> torch.Tensor:
        """The weight matrix ``(∏m, ∏n)``; differentiable."""
        return self.tt.to_dense()

    def bond_spectra(self) -> list[torch.Tensor]:
        return self.tt.spectra()

    def entanglement_entropy(self) -> torch.Tensor:
        return self.tt.entanglement_entropy()

    def bond_report(self) -> list[BondInfo]:
        return self.tt.bond_report()

    def tt_matrices(self) -> dict[str, TTMatrix]:
        """The layer's tensor networks by name (``""``: its weight), for reports and ``torchtn inspect``."""
        return {"": self.tt.detach()}

    # ------------------------------------------------------------------ structural changes
    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Replace the cores (ranks may change; the out/in shapes may not). Optimizers must be told (the trainer's
        ``on_structure_change`` hook rebuilds their state for the new parameters)."""
        cores = check_cores(list(cores))
        new = TTMatrix(cores)
        if (new.out_shape, new.in_shape) != (self.tt.out_shape, self.tt.in_shape):
            raise ValueError(f"cores of modes {new.out_shape}←{new.in_shape} cannot replace "
                             f"{self.tt.out_shape}←{self.tt.in_shape}")
        ref = self._plain_cores("given new cores")[0]
        # contiguous, as a loaded file's are: a layout change alone can change a product's last bits, and a resumed
        # run must repeat the uninterrupted one exactly
        self.cores = nn.ParameterList(nn.Parameter(c.detach().to(device=ref.device, dtype=ref.dtype).clone(
            memory_format=torch.contiguous_format), requires_grad=ref.requires_grad) for c in cores)
        self.clear_caches()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Before ``nn.Module`` copies the cores: when the stored cores are a TT-matrix of this layer's modes with
        other bond dimensions, resize the core parameters to them — in place, so an optimizer built already still
        holds the layer's parameters (its per-parameter state, if any, must be loaded or rebuilt too). Anything else
        is left to ``nn.Module``'s own checks (missing keys, other modes, another number of cores)."""
        mine = self.core_list()
        stored = [state_dict.get(f"{prefix}cores.{k}") for k in range(len(mine))]
        if (f"{prefix}cores.{len(mine)}" not in state_dict
                and all(isinstance(g, torch.Tensor) and g.dim() == 4 for g in stored)
                and any(g.shape != c.shape for g, c in zip(stored, mine))
                and all(g.shape[1:3] == c.shape[1:3] for g, c in zip(stored, mine))):
            try:
                check_cores(stored)
            except ValueError:
                pass  # the bonds do not chain: nn.Module reports the size mismatch
            else:
                with torch.no_grad():
                    for p, g in zip(self._plain_cores("loaded with other bond dimensions"), stored):
                        if p.shape != g.shape:
                            p.data = p.new_empty(g.shape)  # same Parameter object, new shape; values copied next
                            p.grad = None  # a gradient of the old shape could not accumulate
                self.clear_caches()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def clear_caches(self) -> None:
        self._merged.clear()
        self._dense_cache.clear()

    def _cached_dense(self, for_readers: bool = False, fresh: bool = False) -> torch.Tensor:
        """The dense weight, rebuilt only when a core changes while no gradient is needed. ``for_readers``: the copy
        that code outside the layer reads (``weight``), never the tensor the layer computes with; ``fresh``: a new
        copy at every call (a parametrization's tensor, which its module computes with)."""
        cores = self.core_list()
        if (torch.is_grad_enabled() and any([c.requires_grad for c in cores])) or traced():
            return self.tt.to_dense()
        key = tuple([(c.data_ptr(), c._version, tuple(c.shape), c.dtype, c.device) for c in cores])
        what = f"{type(self).__name__}.weight"
        dense = self._dense_cache.get(key, what, self.weight_source)
        if dense is None:
            with kept():
                dense = self.tt.to_dense()
                if len(cores) == 1:  # one core: the dense form is a view of the parameter, which a write would reach
                    dense = dense.clone()
                dense = self._dense_cache.put(key, dense)
        if fresh:
            return self._dense_cache.fresh_copy(dense, what, self.weight_source)
        return self._dense_cache.for_readers(dense, what, self.weight_source) if for_readers else dense

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.double() invalidate cached merges
        self.clear_caches()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles never carry the caches
        state = self.__dict__.copy()
        state["_merged"] = MergedCache()
        state["_dense_cache"] = WeightCache()
        return state
