"""Weights computed from a layer's own parameters (MPO cores, ADTN gates): ``ComputedWeight``, the base of such
layers (a read-only ``weight``: assigning to it fails with a message that says what to do instead), and
``WeightCache``, such a tensor kept between calls, with the copy its readers get (a write into what was read never
reaches what the layer computes with, and is reported at the next read)."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..core._tracing import kept

__all__ = ["ComputedWeight", "WeightCache"]


class ComputedWeight(nn.Module):
    """An ``nn.Module`` whose ``weight`` is a read-only property computed from ``weight_source``.

    ``layer.weight = tensor`` or ``= nn.Parameter(...)`` raises an ``AttributeError`` naming the layer, the
    parameters the weight is made of and the way to start from a dense weight (``from_dense``), instead of
    ``nn.Module``'s ``KeyError: "attribute 'weight' already exists"``.
    """

    #: what the weight is computed from, for the message (e.g. ``"its MPO cores"``)
    weight_source: str = "its parameters"

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            kind = type(self).__name__
            raise AttributeError(
                f"{kind}.weight is read-only: it is computed from {self.weight_source} (got an assignment of "
                f"{type(value).__name__}); to start from a dense layer use {kind}.from_dense(layer, ...); to set "
                f"{self.weight_source}, load_state_dict from another {kind} of the same shape")
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if name == "weight_orig" and not isinstance(param, nn.Parameter):  # torch.nn.utils.prune on the weight
            kind = type(self).__name__
            raise TypeError(
                f"{kind}.weight cannot be pruned as a tensor of its own (torch.nn.utils.prune): it is computed from "
                f"{self.weight_source}; prune those parameters instead (e.g. prune.l1_unstructured on one of "
                f"{[n for n, _ in self.named_parameters() if n != 'bias'][:3]}), or make the layer dense first "
                f"(torchtn.layers.densify)")
        super().register_parameter(name, param)


class WeightCache:
    """One computed tensor kept between calls while its ``key`` (what it was computed from) is unchanged.

    The layer computes with the kept tensor (:meth:`get`); code outside it reads a copy made once
    (:meth:`for_readers`), so that no write into what was handed out — not even through ``.data`` — reaches what the
    layer computes with. A parametrization's tensor is also its module's forward input, so every read gets a fresh
    copy (:meth:`fresh_copy`): a write into one never reaches the next read. Either way an in-place write into what
    was read raises at the next read, once, naming ``what`` and ``source``: the change never reached the layer's
    parameters.
    """

    #: copies from :meth:`fresh_copy` watched at once (the newest is kept; a dropped older one needs no watching)
    WATCHED = 8

    # Each state is one tuple, read once and replaced whole, so threads sharing a layer (a server) never see a key
    # with another key's tensor, or a copy of another tensor than the one they read.
    __slots__ = ("entry", "copy", "handed")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.entry: tuple[object, torch.Tensor, int] | None = None  # (key, tensor, its version when kept)
        self.copy: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (tensor copied, the copy, its version)
        self.handed: list[tuple[weakref.ref, int]] = []

    @property
    def value(self) -> torch.Tensor | None:
        """The kept tensor, if any."""
        entry = self.entry
        return None if entry is None else entry[1]

    @staticmethod
    def _changed(what: str, source: str) -> RuntimeError:
        return RuntimeError(
            f"{what} was changed in place after it was read; it is read-only (computed from {source}), so the "
            f"change did not reach the layer's parameters. To start from a dense weight use the layer's "
            f"from_dense(...) or torchtn.tensorize")

    def get(self, key: object, what: str, source: str) -> torch.Tensor | None:
        """The kept tensor if it was computed for ``key`` (else ``None``)."""
        entry = self.entry
        if entry is None or entry[0] != key:
            return None
        if entry[1]._version != entry[2]:
            self.clear()  # the next read computes it afresh
            raise self._changed(what, source)
        return entry[1]

    def put(self, key: object, value: torch.Tensor) -> torch.Tensor:
        self.entry = (key, value, value._version)
        self.copy, self.handed = None, []
        return value

    def for_readers(self, value: torch.Tensor, what: str, source: str) -> torch.Tensor:
        """``value`` (the kept tensor, from :meth:`get` or :meth:`put`) as code outside the layer reads it: a copy,
        made on the first read and kept with it."""
        copy = self.copy
        if copy is not None and copy[0] is value:
            if copy[1]._version != copy[2]:
                self.copy = None
                raise self._changed(what, source)
            return copy[1]
        with kept():
            mine = value.clone()
        self.copy = (value, mine, mine._version)
        return mine

    def fresh_copy(self, value: torch.Tensor, what: str, source: str) -> torch.Tensor:
        """A new copy of ``value`` (the kept tensor) at every call. The newest copy is kept, so a write into a
        temporary (``module.weight.mul_(0)``) is reported too; older ones are watched while their readers keep them
        (the last :attr:`WATCHED`)."""
        handed = [(ref(), version) for ref, version in self.handed]
        newest = self.copy
        if newest is not None:
            handed.append((newest[1], newest[2]))
        handed = [(t, version) for t, version in handed if t is not None]
        self.copy, self.handed = None, []
        if any(t._version != version for t, version in handed):
            raise self._changed(what, source)
        with kept():
            mine = value.clone()
        self.copy = (value, mine, mine._version)
        self.handed = [(weakref.ref(t), version) for t, version in handed[-(self.WATCHED - 1):]]
        return mine
