"""The one place where zoo models choose between a dense layer and its MPO counterpart."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._checks import check_choice
from ..layers import ADTNLinear, MPOConv2d, MPOLinear

__all__ = ["LAYER_KINDS", "linear", "conv2d", "adtn_config"]

LAYER_KINDS = ("dense", "mpo", "adtn")


def linear(in_features: int, out_features: int, layers: str, rank: int | Sequence[int], *,
           in_shape: Sequence[int] | None = None, out_shape: Sequence[int] | None = None,
           bias: bool = True, depth: int = 2) -> nn.Module:
    """``nn.Linear`` (``layers="dense"``), ``MPOLinear`` with the given modes and bonds (``"mpo"``), or
    ``ADTNLinear`` whose weight a ``depth``-layer deep tensor network generates (``"adtn"``)."""
    check_choice("layers", layers, LAYER_KINDS)
    if layers == "dense":
        return nn.Linear(in_features, out_features, bias=bias)
    if layers == "adtn":
        return ADTNLinear(in_features, out_features, depth, bias=bias)
    return MPOLinear(in_features, out_features, rank, in_shape, out_shape, bias=bias)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, layers: str, rank: int | Sequence[int], *,
           stride: int = 1, padding: int | str = 0, bias: bool = True) -> nn.Module:
    """``nn.Conv2d`` (``layers="dense"``) or ``MPOConv2d`` (im2col-matrix mapping) with bonds ``rank`` (``"mpo"``)."""
    check_choice("layers", layers, ("dense", "mpo"))
    if layers == "dense":
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
    return MPOConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, rank=rank)


def adtn_config(layers: str, depth: int) -> dict:
    """The ADTN depth entry of a zoo model's ``config()``: ``{"adtn_depth": depth}`` with ``layers="adtn"``, else
    nothing (so the files of dense and MPO models keep the configs they always had)."""
    return {"adtn_depth": depth} if layers == "adtn" else {}
