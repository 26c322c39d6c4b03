"""Conv2d geometry shared by the convolution layers: checked like ``nn.Conv2d`` checks it."""
from __future__ import annotations

from collections.abc import Sequence

from torch.nn.modules.utils import _pair

from .._checks import check_choice, check_positive_int

__all__ = ["set_conv_geometry"]


def set_conv_geometry(layer, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], stride,
                      padding, dilation, groups: int) -> None:
    """Validate and store ``in_channels``, ``out_channels``, ``groups``, ``kernel_size``, ``stride``, ``dilation``
    (pairs) and ``padding`` (a pair, or ``"same"``/``"valid"``) on ``layer``."""
    layer.in_channels = check_positive_int("in_channels", in_channels)
    layer.out_channels = check_positive_int("out_channels", out_channels)
    layer.groups = check_positive_int("groups", groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
    layer.kernel_size = tuple(check_positive_int("kernel_size", k) for k in _pair(kernel_size))
    layer.stride = tuple(check_positive_int("stride", s) for s in _pair(stride))
    layer.dilation = tuple(check_positive_int("dilation", s) for s in _pair(dilation))
    if isinstance(padding, str):
        check_choice("padding", padding, ("same", "valid"))
        if padding == "same" and any(s != 1 for s in layer.stride):
            raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
        layer.padding = padding
    else:
        layer.padding = tuple(int(p) for p in _pair(padding))
        if any(p < 0 for p in layer.padding):
            raise ValueError(f"padding={padding!r} is not allowed: expected non-negative integers")
