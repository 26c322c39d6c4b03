"""Stateless kernels the layers call, as ``nn.Linear`` calls ``torch.nn.functional.linear``.

Every function takes plain tensors (cores may be ``nn.Parameter``s), plans its contraction through the shared planner
(:mod:`torchtn.core.contraction`, plans cached per shapes, ranks, batch, dtype, device and grad mode) and is
differentiable with respect to every tensor argument.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._checks import check_input
from .core._tracing import size_hint, traced
from .core.contraction import (
    CostModel,
    MergedCache,
    get_cost_model,
    get_strategy,
    plan_epoch,
    plan_for,
    tt_linear_apply,
)
from .core.tt import check_cores, tt_to_dense

__all__ = ["mpo_linear", "mpo_conv2d", "conv_kernel_to_matrix", "conv_kernel_from_matrix", "is_kernel_tt"]


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
        cores = check_cores(cores if isinstance(cores, torch.Tensor) else list(cores))
        get_strategy("tt_linear", contraction)
        out = math.prod([int(c.shape[1]) for c in cores])
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,)):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias has shape {shape}: expected ({out},), one entry per output of the cores' "
                             f"{out}×{math.prod([int(c.shape[2]) for c in cores])} matrix")
    return tt_linear_apply(x, cores, bias, contraction=contraction, cost_model=cost_model, autotune=autotune,
                           cache=cache)


def conv_kernel_to_matrix(kernel: torch.Tensor, mapping: str = "matrix") -> torch.Tensor:
    """A conv kernel ``(C_out, C_in/g, kh, kw)`` as the matrix an MPO holds: ``"matrix"`` (and ``"kernel"``) —
    ``(C_out, C_in/g·kh·kw)`` in PyTorch's ``(channel, position)`` order; ``"spatial"`` — the same with the input
    index ``(position, channel)``."""
    c_out, cin = kernel.shape[:2]
    if mapping != "spatial":
        return kernel.reshape(c_out, -1)
    return kernel.reshape(c_out, cin, -1).transpose(1, 2).reshape(c_out, -1)


def conv_kernel_from_matrix(matrix: torch.Tensor, in_per_group: int, kernel_size: Sequence[int],
                            mapping: str = "matrix") -> torch.Tensor:
    """The inverse of :func:`conv_kernel_to_matrix`: ``(C_out, fan_in) -> (C_out, C_in/g, kh, kw)``."""
    kh, kw = kernel_size
    c_out = matrix.shape[0]
    if mapping != "spatial":
        return matrix.reshape(c_out, in_per_group, kh, kw)
    return matrix.reshape(c_out, kh * kw, in_per_group).transpose(1, 2).reshape(c_out, in_per_group, kh, kw)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def mpo_conv2d(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *,
               kernel_size: Sequence[int], stride: Sequence[int] = (1, 1), padding: Sequence[int] | str = (0, 0),
               dilation: Sequence[int] = (1, 1), groups: int = 1, mapping: str = "matrix",
               contraction: str = "auto", cost_model: CostModel | None = None, cache: MergedCache | None = None,
               dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """2-D convolution with the kernel held by the TT-matrix ``cores`` (see :class:`torchtn.MPOConv2d`).

    Shape: ``(batch, C_in, H, W) -> (batch, C_out, H', W')``. Three ways, chosen by the cost model unless
    ``contraction`` says (``"rebuild"``/``"patches"``/``"sequential"``): rebuild the kernel (``dense()`` may return a
    cached dense matrix) and call ``F.conv2d``; unfold the input into patches ``(batch·H'·W', C_in·kh·kw)`` and
    contract them through the cores with the planned ``tt_linear`` (``"matrix"``/``"kernel"`` mapping, ``groups ==
    1``, numeric padding only); or — for the ``"kernel"`` mapping (cores over ``C_in, kh, kw, C_out``), ``groups ==
    1`` — four small convolutions in a row, one per core: 1×1 (``C_in → r₁``), ``kh×1`` (``r₁ → r₂``, the height's
    stride, padding and dilation), ``1×kw`` (``r₂ → r₃``, the width's), 1×1 (``r₃ → C_out``, the bias).
    """
    in_per_group = math.prod([int(c.shape[2]) for c in cores]) // (kernel_size[0] * kernel_size[1])
    patches_ok = mapping != "spatial" and groups == 1 and not isinstance(padding, str)
    sequential_ok = groups == 1 and is_kernel_tt(cores, kernel_size, mapping)
    check_input(x, cores[0], min_dim=0, expected=f"(batch, {in_per_group * groups}, H, W)")
    if x.dim() not in (3, 4) or x.shape[-3] != in_per_group * groups:
        raise ValueError(f"input has shape {tuple(x.shape)}: expected (batch, {in_per_group * groups}, H, W) or "
                         f"({in_per_group * groups}, H, W) — {in_per_group * groups} input channels")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    way = contraction if contraction != "auto" else _cheapest_way(x, cores, kernel_size, stride, padding, dilation,
                                                                  patches_ok, sequential_ok, cost_model, cache)
    if way == "patches" and not patches_ok:
        raise ValueError("contraction='patches' needs mapping='matrix' or 'kernel', groups=1 and numeric padding")
    if way == "sequential" and not sequential_ok:
        raise ValueError("contraction='sequential' needs the kernel's TT over (C_in, kh, kw, C_out) (mapping='kernel')"
                         " and groups=1")
    if way == "patches":
        batch, _, h, w = x.shape
        ho = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
        wo = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (B, fan_in, L)
        y = tt_linear_apply(cols.transpose(1, 2), cores, bias, cost_model=cost_model, cache=cache)  # (B, L, C_out)
        y = y.transpose(1, 2).reshape(batch, y.shape[-1], ho, wo)  # (no -1: the batch may be empty)
    elif way == "sequential":
        y = _sequential_conv(x, cores, bias, stride, padding, dilation)
    else:
        needs_grad = torch.is_grad_enabled() and any([c.requires_grad for c in cores])
        matrix = dense() if dense is not None and not needs_grad else tt_to_dense(cores)
        kernel = conv_kernel_from_matrix(matrix, in_per_group, kernel_size, mapping)
        y = F.conv2d(x, kernel, bias, stride, padding, dilation, groups)
    return y.squeeze(0) if unbatched else y


def is_kernel_tt(cores: Sequence[torch.Tensor], kernel_size: Sequence[int], mapping: str = "matrix") -> bool:
    """Whether the cores are the TT of the 4-D kernel over ``(C_in, kh, kw, C_out)``: input modes ``(C_in, kh, kw,
    1)`` and output modes ``(1, 1, 1, C_out)`` of the im2col matrix (the ``"kernel"`` mapping, or the ``"matrix"``
    mapping with these modes) — the form that runs as four small convolutions."""
    if mapping == "spatial" or len(cores) != 4:
        return False
    kh, kw = kernel_size
    return ([tuple(c.shape[1:3]) for c in cores[1:]] == [(1, kh), (1, kw), (int(cores[3].shape[1]), 1)]
            and tuple(cores[0].shape[:2]) == (1, 1))


def _sequential_conv(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None,
                     stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int]) -> torch.Tensor:
    """The ``"kernel"`` mapping's convolution as four small ones: ``K[o, c, i, j] = Σ G₀[c, r₁] G₁[r₁, i, r₂]
    G₂[r₂, j, r₃] G₃[r₃, o]``, so the height and width parts of the kernel act one after the other."""
    g0, g1, g2, g3 = cores  # (1, 1, C_in, r1), (r1, 1, kh, r2), (r2, 1, kw, r3), (r3, C_out, 1, 1)
    pad_h, pad_w = (padding, padding) if isinstance(padding, str) else ((padding[0], 0), (0, padding[1]))
    y = F.conv2d(x, g0[0, 0].T[:, :, None, None])
    y = F.conv2d(y, g1[:, 0].permute(2, 0, 1)[..., None], None, (stride[0], 1), pad_h, (dilation[0], 1))
    y = F.conv2d(y, g2[:, 0].permute(2, 0, 1)[:, :, None, :], None, (1, stride[1]), pad_w, (1, dilation[1]))
    return F.conv2d(y, g3[:, :, 0, 0].T[:, :, None, None], bias)


def _cheapest_way(x, cores, kernel_size, stride, padding, dilation, patches_ok, sequential_ok, cost_model,
                  cache) -> str:
    """``"rebuild"``, ``"patches"`` or ``"sequential"``, priced by the device's cost model (memoized per call
    signature in ``cache``)."""
    if not (patches_ok or sequential_ok):
        return "rebuild"
    needs_grad = torch.is_grad_enabled() and any([c.requires_grad for c in cores])
    if traced():  # (sizes may be symbolic there: no memo keyed on them, as in tt_linear_apply)
        cache = None
    key = ("conv", tuple(x.shape), x.dtype, x.device, needs_grad, tuple([c.shape for c in cores]), plan_epoch())
    if cache is not None and key in cache.plans:
        return cache.plans[key]
    batch, _, h, w = (size_hint(s) for s in x.shape)  # (symbolic sizes priced by their example: no guards)
    if isinstance(padding, str):  # "valid", or "same" (stride 1): the output keeps the input's size
        ho, wo = (h, w) if padding == "same" else (_out_size(h, kernel_size[0], stride[0], 0, dilation[0]),
                                                   _out_size(w, kernel_size[1], stride[1], 0, dilation[1]))
    else:
        ho = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
        wo = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    rows = batch * ho * wo
    model = cost_model if cost_model is not None else get_cost_model(x.device)
    size = x.element_size()
    passes = 3 if needs_grad else 1
    common = dict(dtype=x.dtype, device=x.device, needs_grad=needs_grad, input_grad=x.requires_grad,
                  cache_merged=not needs_grad, cost_model=cost_model)
    fan_in = math.prod([int(c.shape[2]) for c in cores])
    out = math.prod([int(c.shape[1]) for c in cores])
    # rebuild: the kernel and one convolution, priced as the dense plan of its im2col GEMM
    prices = {"rebuild": plan_for(cores, rows, contraction="dense", **common).seconds}
    if patches_ok:
        best = plan_for(cores, rows, **common)
        if not best.is_dense:
            prices["patches"] = (best.seconds + model.copy_seconds(rows * fan_in, size)
                                 + model.copy_seconds(rows * out, size))
    if sequential_ok:
        cin, kh, kw = (int(c.shape[2]) for c in cores[:3])
        r1, r2, r3 = (int(c.shape[3]) for c in cores[:3])
        convs = [(batch * h * w, r1, cin), (batch * ho * w, r2, r1 * kh), (rows, r3, r2 * kw), (rows, out, r3)]
        prices["sequential"] = passes * sum([model.matmul_seconds(n, a, k, 1, size) + model.copy_seconds(n * k, size)
                                             for n, a, k in convs])
    way = "rebuild"
    for name, price in prices.items():  # (not min(prices, key=...): torch.compile cannot trace it on symbolic sizes)
        if price < prices[way]:
            way = name
    if cache is not None:
        cache.plans[key] = way
    return way
