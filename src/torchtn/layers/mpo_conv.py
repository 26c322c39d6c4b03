"""``MPOConv2d``: a drop-in ``nn.Conv2d`` whose kernel is a matrix product operator (TT-matrix).

Two kernel mappings (Gao et al. 2020, §4.2 of ``spec/mpo.md``; which one the paper's conv results used is not known):

* ``"matrix"`` (default): the im2col matrix ``W (C_out, C_in/groups·kh·kw)`` — exactly ``conv.weight`` with each
  filter flattened in PyTorch's C order ``(c, i, j)`` — is one TT-matrix; the kernel's ``kh·kw`` positions fall into
  the least significant (last) input mode. Any factorization of the two sizes can be given.
* ``"spatial"`` (Garipov et al. 2016): a spatial core over the ``kh·kw`` positions followed by channel cores, i.e. a
  TT-matrix with input modes ``(kh·kw, c_1, …, c_d)`` and output modes ``(1, c'_1, …, c'_d)`` whose input index is
  ``(position, channel)``; the kernel is that matrix with its input index permuted to PyTorch's ``(channel,
  position)``.
* ``"kernel"``: the TT of the 4-D kernel over ``(C_in, kh, kw, C_out)`` (the "TT convolution" of tltorch and of
  Lebedev-style decompositions) — the im2col matrix with input modes ``(C_in/g, kh, kw, 1)`` and output modes
  ``(1, 1, 1, C_out)``. Its convolution runs as four small ones in a row (1×1, ``kh×1``, ``1×kw``, 1×1).

The forward pass is planned: the kernel is rebuilt from the cores (cached in inference) and handed to ``F.conv2d``;
or — for the matrix and kernel mappings without groups — the input is unfolded into patches and contracted through
the cores by the ``tt_linear`` planner; or — for the kernel mapping — the four small convolutions run; whichever the
cost model prices lowest (``contraction="rebuild"`` / ``"patches"`` / ``"sequential"`` forces one).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_rel_tol
from .._modules import carry_over
from ..core.factorize import resolve_shapes, suggest_shapes
from ..core.tt import TTMatrix, inner_ranks
from ..functional import conv_kernel_from_matrix, conv_kernel_to_matrix, is_kernel_tt, mpo_conv2d
from ._conv import set_conv_geometry
from .registry import register_layer
from .tt_layer import TTLayer

__all__ = ["MPOConv2d", "kernel_modes"]

_MAPPINGS = ("matrix", "spatial", "kernel")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@register_layer(converts=(nn.Conv2d,))
class MPOConv2d(TTLayer):
    """2-D convolution ``(batch, C_in, H, W) -> (batch, C_out, H', W')`` with an MPO kernel.

    Arguments as ``nn.Conv2d`` (``stride``, ``padding`` incl. ``"same"``/``"valid"``, ``dilation``, ``groups``,
    ``bias``, ``padding_mode``, ``device``, ``dtype``), plus ``rank`` (an int caps every bond, or one per bond),
    ``mapping`` (``"matrix"``, ``"spatial"`` or ``"kernel"``, see the module docstring), ``in_shape``/``out_shape``
    (the modes of the kernel matrix's input and output sizes — for ``"spatial"``, of the channels only; default:
    balanced factorizations; fixed for ``"kernel"``) and ``contraction`` (``"auto"``, ``"rebuild"``, ``"patches"``,
    ``"sequential"``). Initialized like ``nn.Conv2d``: ``Var(K) = 1/(3·fan_in)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rank: int | Sequence[int] = 8, mapping: str = "matrix", in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, contraction: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.padding_mode = check_choice("padding_mode", padding_mode, _PADDING_MODES)
        self.mapping = check_choice("mapping", mapping, _MAPPINGS)
        self.contraction = check_choice("contraction", contraction, ("auto", "rebuild", "patches", "sequential"))
        if self.contraction == "patches" and (self.mapping == "spatial" or self.groups != 1):
            raise ValueError("contraction='patches' needs mapping='matrix' or 'kernel' and groups=1")
        self.in_shape, self.out_shape = self._shapes(in_shape, out_shape)
        ranks = (1, *inner_ranks(rank, self.in_shape, self.out_shape, name="rank"), 1)
        self._init_cores(TTMatrix([torch.empty(ranks[k], m, n, ranks[k + 1], device=device, dtype=dtype)
                                   for k, (m, n) in enumerate(zip(self.out_shape, self.in_shape))]))
        if self.contraction == "sequential" and not (
                self.groups == 1 and is_kernel_tt(self.core_list(), self.kernel_size, self.mapping)):
            raise ValueError("contraction='sequential' needs the kernel's TT over (C_in, kh, kw, C_out) "
                             "(mapping='kernel') and groups=1")
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------ shapes
    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def _shapes(self, in_shape, out_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        positions = self.kernel_size[0] * self.kernel_size[1]
        cin = self.in_channels // self.groups
        if self.mapping == "matrix":
            return _matrix_shapes(cin, self.out_channels, positions, in_shape, out_shape)
        if self.mapping == "kernel":  # fixed modes: C_in, kh, kw in, C_out out
            fixed = kernel_modes(cin, self.out_channels, self.kernel_size)
            for name, given, want in (("in_shape", in_shape, fixed[0]), ("out_shape", out_shape, fixed[1])):
                if given is not None and tuple(given) != want:
                    raise ValueError(f"{name}={tuple(given)!r} is not allowed with mapping='kernel': its modes are "
                                     f"fixed, {want}")
            return fixed
        # spatial: a leading site (m = 1, n = kh·kw), then channel sites
        chan_in, chan_out = resolve_shapes(cin, self.out_channels, in_shape, out_shape)
        return (positions, *chan_in), (1, *chan_out)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Gaussian cores with ``Var(K) = 1/(3·fan_in)`` (``nn.Conv2d``'s default); bias ``U(±1/√fan_in)``."""
        self._reset(self.fan_in, self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int | Sequence[int] | None = None, rel_tol: float | None = None,
                   mapping: str = "matrix", in_shape: Sequence[int] | None = None,
                   out_shape: Sequence[int] | None = None, **kwargs) -> "MPOConv2d":
        """Convert a trained ``nn.Conv2d`` by TT-SVD of its kernel (``rank`` cap and/or ``rel_tol`` error bound);
        with neither, exactly (full rank). Stride, padding, dilation, groups, padding mode and bias are copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        rel_tol = check_rel_tol("rel_tol", rel_tol)
        empty = cls._like(conv, rank=1, mapping=mapping, in_shape=in_shape, out_shape=out_shape, device="meta")
        max_rank = None if rank is None else inner_ranks(rank, empty.in_shape, empty.out_shape, name="rank")
        matrix = empty._to_matrix(conv.weight.detach())
        tt = TTMatrix.from_dense(matrix, empty.in_shape, empty.out_shape, max_rank=max_rank, rel_tol=rel_tol)
        return cls.from_tt(conv, tt, mapping=mapping, **kwargs)

    @classmethod
    def _like(cls, conv: nn.Conv2d, **kwargs) -> "MPOConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, conv.padding_mode, **kwargs)

    # ------------------------------------------------------------------ kernel <-> matrix
    def _to_matrix(self, kernel: torch.Tensor) -> torch.Tensor:
        """``(C_out, C_in/g, kh, kw)`` kernel → the TT-matrix's dense form for this mapping."""
        return conv_kernel_to_matrix(kernel, self.mapping)

    def _from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """The TT-matrix's dense form → the ``(C_out, C_in/g, kh, kw)`` kernel."""
        return conv_kernel_from_matrix(matrix, self.in_channels // self.groups, self.kernel_size, self.mapping)

    def to_dense(self) -> torch.Tensor:
        """The kernel ``(C_out, C_in/groups, kh, kw)``, like ``conv.weight``; differentiable."""
        return self._from_matrix(self.tt.to_dense())

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed kernel (read-only; cached while the cores do not change and need no gradient)."""
        return self._from_matrix(self._cached_dense(for_readers=True))

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same map."""
        ref = self.cores[0]
        return self._dense_copy(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, self.bias is not None,
                                          self.padding_mode, device=ref.device, dtype=ref.dtype))

    to_dense_module = to_conv

    # ------------------------------------------------------------------ registry protocol
    @staticmethod
    def dense_matrix(conv: nn.Conv2d) -> torch.Tensor:
        """The kernel as the im2col matrix ``(C_out, C_in/groups·kh·kw)`` (the default ``"matrix"`` mapping)."""
        return conv.weight.detach().reshape(conv.out_channels, -1)

    @staticmethod
    def tt_shapes_for(conv: nn.Conv2d, in_shape: Sequence[int] | None = None,
                      out_shape: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return _matrix_shapes(conv.in_channels // conv.groups, conv.out_channels,
                              conv.kernel_size[0] * conv.kernel_size[1], in_shape, out_shape)

    @classmethod
    def from_tt(cls, conv: nn.Conv2d, tt: TTMatrix, mapping: str = "matrix", **kwargs) -> "MPOConv2d":
        """The layer replacing ``conv``: kernel ``tt`` (for ``mapping``), ``conv``'s geometry and bias."""
        ref = conv.weight
        skip = 1 if mapping == "spatial" else 0  # the constructor takes the channel modes; the spatial site is implied
        layer = cls._like(conv, rank=list(tt.ranks[1:-1]) or 1, mapping=mapping, in_shape=tt.in_shape[skip:],
                          out_shape=tt.out_shape[skip:], device=ref.device, dtype=ref.dtype, **kwargs)
        if layer.ranks != tt.ranks:
            raise ValueError(f"ranks {tt.ranks} are not valid for modes {tt.out_shape}←{tt.in_shape}")
        with torch.no_grad():
            for p, g in zip(layer.cores, tt.cores):
                p.copy_(g)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return carry_over(layer, conv)

    def layout(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "mapping": self.mapping, "in_shape": list(self.in_shape),
                "out_shape": list(self.out_shape), "ranks": list(self.ranks), "contraction": self.contraction}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "MPOConv2d":
        mapping = spec.get("mapping", "matrix")
        in_shape, out_shape = list(spec["in_shape"]), list(spec["out_shape"])
        if mapping == "spatial":  # the constructor takes the channel modes; the spatial site is implied
            in_shape, out_shape = in_shape[1:], out_shape[1:]
        padding = spec["padding"]
        layer = cls(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                    padding if isinstance(padding, str) else tuple(padding), tuple(spec["dilation"]), spec["groups"],
                    bool(spec["bias"]), spec["padding_mode"], rank=list(spec["ranks"][1:-1]) or 1, mapping=mapping,
                    in_shape=in_shape, out_shape=out_shape, contraction=spec.get("contraction", "auto"),
                    device=device, dtype=dtype)
        if list(layer.ranks) != list(spec["ranks"]):
            raise ValueError(f"recorded ranks {list(spec['ranks'])} are not valid for this kernel's modes")
        return layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C_in, H, W) -> (batch, C_out, H', W')`` (or unbatched ``(C_in, H, W)``)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            pad = _reversed_padding(self.kernel_size, self.dilation, padding)
            x = F.pad(x, pad, mode=self.padding_mode)
            padding = (0, 0)
        return mpo_conv2d(x, self.core_list(), self.bias, kernel_size=self.kernel_size, stride=self.stride,
                          padding=padding, dilation=self.dilation, groups=self.groups, mapping=self.mapping,
                          contraction=self.contraction, cache=self._merged, dense=self._cached_dense)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, mapping={self.mapping!r}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, ranks={self.ranks}, compression={self.compression_ratio:.1f}x")


def kernel_modes(in_channels: int, out_channels: int, kernel_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``(in_shape, out_shape)`` of the im2col matrix whose TT is the 4-D kernel's over ``(C_in, kh, kw, C_out)``
    (the ``"kernel"`` mapping; pass them as ``tensorize(shapes=…)`` or use ``tensorize(conv_modes="kernel")``)."""
    return (in_channels, *kernel_size, 1), (1, 1, 1, out_channels)


def _matrix_shapes(cin: int, cout: int, positions: int, in_shape, out_shape) -> tuple[tuple[int, ...], ...]:
    """Modes of the im2col matrix ``(C_out, C_in·kh·kw)``: given ones are checked; by default the channels are
    factorized in balance and the ``kh·kw`` kernel positions join the last (least significant) input mode, so no
    mode mixes channels with positions."""
    if in_shape is None and out_shape is None:
        chan_in, chan_out = suggest_shapes(cin, cout)
        return (*chan_in[:-1], chan_in[-1] * positions), chan_out
    return resolve_shapes(cin * positions, cout, in_shape, out_shape)


def _reversed_padding(kernel_size, dilation, padding) -> list[int]:
    """``F.pad`` amounts (last dimension first) for a non-zero padding mode, as ``nn.Conv2d`` computes them."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        out = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            left = total // 2
            out += [left, total - left]
        return out
    return [p for p in reversed(padding) for _ in range(2)]
