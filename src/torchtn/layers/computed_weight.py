"""Weights computed from a layer's own parameters (MPO cores, ADTN gates): ``ComputedWeight``, the base of such
layers (a read-only ``weight``: assigning to it fails with a message that says what to do instead), and
``WeightCache``, the one kept copy of such a tensor between calls (a write into it is caught, not silently used)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

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


class WeightCache:
    """One computed tensor kept between calls while its ``key`` (what it was computed from) is unchanged.

    The tensor is handed out as it is (a copy per read would cost a matrix), so code may write into it: a read that
    finds the tensor changed in place since it was computed drops it and raises, naming ``what`` and ``source`` —
    the change never reached the layer's parameters, and the layer must not compute with it either.
    """

    __slots__ = ("key", "value", "version")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: object = None
        self.value: torch.Tensor | None = None
        self.version = 0

    def get(self, key: object, what: str, source: str) -> torch.Tensor | None:
        """The kept tensor if it was computed for ``key`` (else ``None``)."""
        value = self.value
        if value is None or self.key != key:
            return None
        if value._version != self.version:
            self.clear()  # the next read computes it afresh
            raise RuntimeError(
                f"{what} was changed in place after it was read; it is read-only (computed from {source}), so the "
                f"change did not reach the layer's parameters. To start from a dense weight use the layer's "
                f"from_dense(...) or torchtn.tensorize")
        return value

    def put(self, key: object, value: torch.Tensor) -> torch.Tensor:
        self.key, self.value, self.version = key, value, value._version
        return value
