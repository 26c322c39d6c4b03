"""t-product layers (Newman, Horesh, Avron, Kilmer): dense layers whose weights are third-order tensors multiplied by
the ⋆M product of :mod:`torchtn.core.mprod`.

Layout: modules take a batch ``(batch, features, tubes)`` — an image ``(batch, H, W)`` is ``H`` features (rows) of
tubes of length ``W`` (columns), and ``(batch, C, H, W)`` is read as ``(batch, C·H, W)`` — and internally work on
the paper's ``(features, batch, tubes)`` lateral-slice layout, where a t-linear layer is ``W ⋆M X + B`` with
``W (out, in, tubes)``, ``B (out, 1, tubes)``: one batched matmul over the tube slices in the transform domain.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_input, check_nonnegative_real, check_positive_int
from ..core._dtypes import half_to_float
from ..core._tracing import kept, traced
from ..core.contraction import scratch_buffer
from ..core.mprod import TRANSFORMS, Transform, facewise, mtran, t_eye, transform
from .registry import register_layer

__all__ = ["TLinear", "TResidual", "TAntisymmetric", "THamiltonian", "as_tubes", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": torch.tanh, "relu": torch.relu,
                                                                   "identity": lambda x: x}


def as_tubes(x: torch.Tensor, features: int | None = None, tubes: int | None = None,
             like: torch.Tensor | None = None) -> torch.Tensor:
    """Images ``(batch, C, H, W)`` -> ``(batch, C·H, W)``; ``(batch, features, tubes)`` unchanged. With ``features``
    and ``tubes``: checks that the result has them (the error names the shape given); with ``like`` (a layer's
    parameter): that ``x`` has its dtype and device."""
    if like is not None:
        check_input(x, like, min_dim=0, expected="(batch, features, tubes) or images (batch, C, H, W)")
    if x.dim() not in (3, 4):
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (batch, features, tubes) or images (batch, C, H, W)")
    out = x.flatten(1, 2) if x.dim() == 4 else x
    if features is not None and out.shape[1:] != (features, tubes):
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (batch, {features}, {tubes}) or images "
                         f"(batch, C, H, {tubes}) with C·H = {features}")
    return out


class _TModule(nn.Module):
    """Holds the transform: by name (``dct``, ``dft``, ``identity``), or as a matrix buffer ``M`` saved with the
    weights (``orthogonal``, ``data``, a user matrix)."""

    def _init_transform(self, M: str | torch.Tensor | Transform, tubes: int, data: torch.Tensor | None,
                        dtype=None, device=None) -> None:
        if isinstance(M, str) and M not in TRANSFORMS:
            raise ValueError(f"M={M!r} is not allowed: expected one of {', '.join(map(repr, TRANSFORMS))} or an "
                             f"invertible (tubes, tubes) tensor")
        t = transform(M, tubes, data=data, dtype=torch.float64)
        self.transform_name = t.name
        self.transform_orthogonal = t.orthogonal
        if t.name in ("dct", "dft", "identity"):
            self.M = None
        else:
            self.register_buffer("M", t.matrix.to(dtype=dtype or torch.get_default_dtype(), device=device,
                                                  memory_format=torch.contiguous_format))

    @property
    def T(self) -> Transform:
        """The transform: named ones built once at the weights' dtype and device (rebuilt after ``.to()`` /
        ``.double()``, see :meth:`_apply`; no conversion of ``M`` at each call); over the ``M`` buffer otherwise."""
        if self.M is not None:
            return Transform(self.transform_name, self.tubes, self.M, self.transform_orthogonal)
        cached = self.__dict__.get("_named_T")
        if cached is None:
            ref = next(self.parameters(), None)
            at = {} if ref is None or not ref.is_floating_point() else {"dtype": ref.dtype, "device": ref.device}
            with kept():
                cached = transform(self.transform_name, self.tubes, **at)
            if not traced():  # a traced call's matrix is a fake tensor: never kept
                self.__dict__["_named_T"] = cached
        return cached

    def _apply(self, fn, recurse=True):  # a move or a cast: the named transform is rebuilt at the new dtype/device
        self.__dict__.pop("_named_T", None)
        return super()._apply(fn, recurse)

    def _transformed(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight ×₃ M``: recomputed whenever a gradient may flow, cached in eval until the weight changes."""
        if torch.is_grad_enabled() and weight.requires_grad or traced():
            return _weight_hat(weight, self.T)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
               None if self.M is None else (self.M.data_ptr(), self.M._version))
        cached = self.__dict__.get("_weight_hat")
        if cached is None or cached[0] != key:
            with kept():
                cached = self.__dict__["_weight_hat"] = (key, _weight_hat(weight, self.T))
        return cached[1]

    def _weights_and_biases(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.weight, self.bias)]

    def reset_parameters(self) -> None:
        """The layers' init (Kaiming-uniform weights, PyTorch's bias bound for ``fan_in = in · tubes``, as the
        reference code) and, for ``M="orthogonal"``, its seeded matrix again (what a layer built on the meta device
        and moved with ``to_empty`` needs; a data-driven or user ``M`` is the caller's to load)."""
        for weight, bias in self._weights_and_biases():
            _tubal_init(weight, bias)
        if self.transform_name == "orthogonal":
            with torch.no_grad():
                self.M.copy_(transform("orthogonal", self.tubes, dtype=torch.float64).matrix)

    def _transform_layout(self) -> dict[str, Any]:
        return {"M": self.transform_name if self.M is None else "matrix", "M_orthogonal": self.transform_orthogonal,
                "tubes": self.tubes}

    @staticmethod
    def _placeholder(spec: dict[str, Any]):
        """The transform to build an empty layer with; a matrix transform is overwritten by the file's ``M``."""
        if spec["M"] != "matrix":
            return spec["M"]
        n = spec["tubes"]
        return torch.eye(n, dtype=torch.float64) if spec.get("M_orthogonal", True) else 2 * torch.eye(n)

    def tt_matrices(self) -> dict:
        return {}


def _slice_major(T: Transform) -> bool:
    """Whether :func:`_t_linear` runs slice-major: for the identity and orthogonal matrix transforms (the DCT below
    512 tubes, ``orthogonal``, ``data``, an orthogonal user matrix)."""
    return T.name == "identity" or (T.matrix is not None and T.orthogonal and not T.is_complex)


def _half_spectrum(T: Transform, weight: torch.Tensor) -> bool:
    """Whether :func:`_t_linear` runs on the half spectrum: the DFT with a real weight (the layers' inputs are real
    tubes, whose DFT slices ``k`` and ``n − k`` are conjugates)."""
    return T.name == "dft" and not weight.is_complex()


def _weight_hat(weight: torch.Tensor, T: Transform) -> torch.Tensor:
    """``W (out, in, n)`` in the transform domain, laid out as :func:`_t_linear` takes it: ``(n, out, in)`` when it
    runs slice-major (one GEMM ``M · W``), ``(n//2 + 1, out, in)`` complex for the DFT of real tubes (``rfft``),
    else ``(out, in, n)``."""
    if _half_spectrum(T, weight):
        return torch.fft.rfft(half_to_float(weight), dim=-1).permute(2, 0, 1).contiguous()
    if not _slice_major(T):
        return T.forward(weight)
    out, fan_in, n = weight.shape
    if T.name == "identity":
        return weight.permute(2, 0, 1).contiguous()
    return (T._m(weight) @ weight.reshape(out * fan_in, n).T).view(n, out, fan_in)


def _t_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, T: Transform,
              weight_hat: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, in, n) -> (batch, out, n)``: ``W ⋆M X + B`` in one batched matmul over the transform slices
    (``weight_hat``: ``W`` already in the transform domain, from :func:`_weight_hat`).

    Slice-major (:func:`_slice_major`): the input goes to the transform domain as ``(n, batch, in)`` in one GEMM
    (``M · Xᵀ``), the slices multiply in one ``bmm``, and one GEMM (``Ŷᵀ · M``, the inverse of an orthogonal ``M``)
    returns ``(batch, out, n)`` — no permuting copies. The DFT of real tubes multiplies only the ``n//2 + 1`` slices
    of the half spectrum (``rfft``/``irfft``). Otherwise (FFT-based DCT, complex tubes, non-orthogonal ``M``): the
    transforms along the last dim of the paper's ``(features, batch, n)`` layout.
    """
    if x.shape[0] == 0:  # an empty batch (PyTorch's CPU FFTs fail on empty tensors), still tied to the parameters
        y = x.new_zeros(0, weight.shape[0], x.shape[-1]) + (x.sum() + weight.sum()) * 0
        return y if bias is None else y + bias.transpose(0, 1)
    what = _weight_hat(weight, T) if weight_hat is None else weight_hat
    if _half_spectrum(T, weight):  # only the n//2 + 1 first slices are multiplied
        n = x.shape[-1]
        # (n//2 + 1, batch, in), contiguous: a complex bmm on the permuted view is ~3× slower than copy + bmm
        x_hat = torch.fft.rfft(half_to_float(x), dim=-1).permute(2, 0, 1).contiguous()
        if traced():  # the same product in real arithmetic: ONNX has no complex matmul (nor complex numbers)
            xr, xi, wr, wi = x_hat.real, x_hat.imag, what.real.transpose(1, 2), what.imag.transpose(1, 2)
            y_hat = torch.complex(torch.bmm(xr, wr) - torch.bmm(xi, wi), torch.bmm(xr, wi) + torch.bmm(xi, wr))
        else:
            y_hat = torch.bmm(x_hat, what.transpose(1, 2))
        y = torch.fft.irfft(y_hat.permute(1, 2, 0), n=n, dim=-1)
        y = y if bias is None else y.add_(bias.transpose(0, 1))
        return y.to(x.dtype)  # (half precision: the FFTs ran in float32)
    if _slice_major(T):
        batch, fan_in, n = x.shape
        out = what.shape[1]
        if T.name == "identity":
            # contiguous slices: a bmm on the permuted view is ~2× slower than a copy and a bmm
            y = torch.bmm(x.permute(2, 0, 1).contiguous(), what.transpose(1, 2)).permute(1, 2, 0)
        else:
            M = T._m(x)
            # without gradients the two intermediates go into reused scratch buffers (as the MPO planner's do): a
            # fresh tensor of a few hundred KiB can have its pages faulted in on every call
            free = not torch.is_grad_enabled() and not traced()
            x_hat = torch.mm(M, x.reshape(batch * fan_in, n).T, out=scratch_buffer(0, n * batch * fan_in, x.dtype, x.device)
                             .view(n, batch * fan_in) if free else None).view(n, batch, fan_in)
            y_hat = torch.bmm(x_hat, what.transpose(1, 2), out=scratch_buffer(1, n * batch * out, x.dtype, x.device)
                              .view(n, batch, out) if free else None)  # (n, batch, out)
            y = (y_hat.view(n, batch * out).T @ M).view(batch, out, n)
        return y if bias is None else y.add_(bias.transpose(0, 1))  # y: a fresh product no backward formula needs
    X = T.forward(x.transpose(0, 1))  # (in, batch, n) in the transform domain
    y = T.inverse(facewise(what, X))
    if bias is not None:
        y = y + bias
    return y.transpose(0, 1)


def _tubal_init(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # fan_in = in · tubes, as the reference code
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2]
        nn.init.uniform_(bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


@register_layer("TLinear")
class TLinear(_TModule):
    """t-linear layer ``(batch, in_features, tubes) -> (batch, out_features, tubes)``: ``Y = W ⋆M X + B`` with
    ``W (out, in, tubes)`` and a bias tube per output (``out · in · tubes + out · tubes`` parameters, ``tubes``
    times fewer than the dense layer on the vectorized slices). ``M``: a transform name or matrix
    (:func:`torchtn.core.mprod.transform`; ``data=`` for ``"data"``)."""

    def __init__(self, in_features: int, out_features: int, tubes: int, *, M: str | torch.Tensor = "dct",
                 bias: bool = True, data: torch.Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.tubes = check_positive_int("tubes", tubes)
        self._init_transform(M, tubes, data, dtype, device)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, tubes, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, 1, tubes, **kw)) if bias else None
        _tubal_init(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_tubes(x, self.in_features, self.tubes, self.weight)
        return _t_linear(x, self.weight, self.bias, self.T, self._transformed(self.weight))

    def layout(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                **self._transform_layout()}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "TLinear":
        return cls(spec["in_features"], spec["out_features"], spec["tubes"], M=cls._placeholder(spec),
                   bias=spec["bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tubes={self.tubes}, "
                f"M={self.transform_name!r}, bias={self.bias is not None}")


class _TStep(_TModule):
    """One forward-Euler step ``Y + h σ(K(W) ⋆M Y + B)`` on ``(batch, features, tubes)``; ``K`` is the subclass's."""

    def __init__(self, features: int, tubes: int, *, h: float = 0.1, activation: str = "tanh",
                 M: str | torch.Tensor = "dct", data: torch.Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.features = check_positive_int("features", features)
        self.tubes = check_positive_int("tubes", tubes)
        if not (isinstance(h, (int, float)) and h > 0):
            raise ValueError(f"h={h!r} is not allowed: expected a step size > 0")
        self.h, self.activation = float(h), check_choice("activation", activation, tuple(ACTIVATIONS))
        self._init_transform(M, tubes, data, dtype, device)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(features, features, tubes, **kw))
        self.bias = nn.Parameter(torch.empty(features, 1, tubes, **kw))
        _tubal_init(self.weight, self.bias)

    def operator(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_tubes(x, self.features, self.tubes, self.weight)
        return x + self.h * ACTIVATIONS[self.activation](_t_linear(x, self.operator(), self.bias, self.T))

    def layout(self) -> dict[str, Any]:
        return {"features": self.features, "h": self.h, "activation": self.activation, **self._transform_layout()}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None):
        extra = {k: spec[k] for k in ("gamma",) if k in spec}
        return cls(spec["features"], spec["tubes"], h=spec["h"], activation=spec["activation"],
                   M=cls._placeholder(spec), device=device, dtype=dtype, **extra)


@register_layer("TResidual")
class TResidual(_TStep):
    """Residual t-layer ``Y + h σ(W ⋆M Y + B)``: ``(batch, features, tubes) -> (batch, features, tubes)``."""


@register_layer("TAntisymmetric")
class TAntisymmetric(_TStep):
    """Antisymmetric (stable) t-layer ``Y + h σ((W − Wᵀ − γI) ⋆M Y + B)``, ``Wᵀ`` the ⋆M transpose, ``I`` the
    identity tensor. The operator's transform-domain slices are antisymmetric minus ``γI``, so their eigenvalues
    have real part ``−γ`` (Haber–Ruthotto). The authors' released code adds ``W + Wᵀ`` (a symmetric matrix); this is
    the intended minus sign."""

    def __init__(self, features: int, tubes: int, *, gamma: float = 1e-4, **kwargs) -> None:
        super().__init__(features, tubes, **kwargs)
        check_nonnegative_real("gamma", gamma)
        self.gamma = float(gamma)

    def operator(self) -> torch.Tensor:
        T = self.T
        eye = t_eye(self.features, T, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight - mtran(self.weight, T) - self.gamma * eye

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "gamma": self.gamma}


@register_layer("THamiltonian")
class THamiltonian(_TModule):
    """A Hamiltonian t-ResNet of ``depth`` leapfrog steps (the stable network of Newman et al.), on
    ``(batch, features, tubes)``; with ``Z_0 = 0``:

        Z_{j+1} = Z_j − h σ(W_jᵀ ⋆M Y_j + b_j),      Y_{j+1} = Y_j + h σ(W_j ⋆M Z_{j+1} + b_j),

    ``W_j (features, width, tubes)``, one bias tube ``b_j (1, 1, tubes)`` per step. The map ``(Y_j, Z_j) →
    (Y_{j+1}, Z_{j+1})`` is exactly invertible (:meth:`inverse`); forward propagation neither blows up nor dies out
    with depth. ``forward`` returns ``Y``; :meth:`forward_states` returns ``(Y, Z)``.
    """

    def __init__(self, features: int, tubes: int, depth: int, *, width: int | None = None, h: float = 0.25,
                 activation: str = "tanh", M: str | torch.Tensor = "dct", data: torch.Tensor | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.features = check_positive_int("features", features)
        self.tubes = check_positive_int("tubes", tubes)
        self.depth = check_positive_int("depth", depth)
        self.width = check_positive_int("width", features if width is None else width)
        if not (isinstance(h, (int, float)) and h > 0):
            raise ValueError(f"h={h!r} is not allowed: expected a step size > 0")
        self.h, self.activation = float(h), check_choice("activation", activation, tuple(ACTIVATIONS))
        self._init_transform(M, tubes, data, dtype, device)
        kw = {"device": device, "dtype": dtype}
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for _ in range(depth):
            w, b = torch.empty(features, self.width, tubes, **kw), torch.empty(1, 1, tubes, **kw)
            _tubal_init(w, b)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def _weights_and_biases(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return list(zip(self.weights, self.biases))

    def forward_states(self, y: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y_0, Z_0) -> (Y_depth, Z_depth)`` (``Z_0 = 0`` by default)."""
        y = as_tubes(y, self.features, self.tubes, self.weights[0])
        z = y.new_zeros(y.shape[0], self.width, self.tubes) if z is None else z
        T, act, h = self.T, ACTIVATIONS[self.activation], self.h
        for w, b in zip(self.weights, self.biases):
            z = z - h * act(_t_linear(y, mtran(w, T), b, T))
            y = y + h * act(_t_linear(z, w, b, T))
        return y, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_states(x)[0]

    def inverse(self, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo :meth:`forward_states`: ``(Y_depth, Z_depth) -> (Y_0, Z_0)``, step by step backwards."""
        T, act, h = self.T, ACTIVATIONS[self.activation], self.h
        for w, b in zip(reversed(list(self.weights)), reversed(list(self.biases))):
            y = y - h * act(_t_linear(z, w, b, T))
            z = z + h * act(_t_linear(y, mtran(w, T), b, T))
        return y, z

    def layout(self) -> dict[str, Any]:
        return {"features": self.features, "depth": self.depth, "width": self.width, "h": self.h,
                "activation": self.activation, **self._transform_layout()}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "THamiltonian":
        return cls(spec["features"], spec["tubes"], spec["depth"], width=spec["width"], h=spec["h"],
                   activation=spec["activation"], M=cls._placeholder(spec), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"features={self.features}, tubes={self.tubes}, depth={self.depth}, width={self.width}, h={self.h}, "
                f"M={self.transform_name!r}")
