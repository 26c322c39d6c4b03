"""The ⋆M tensor–tensor product (Kilmer, Martin, Newman, Horesh, Avron) on third-order tensors.

A tensor ``A (p, s, n)`` is a ``p × s`` matrix whose entries are *tubes* of length ``n``. An invertible transform
``M (n × n)`` acts on the tubes (``Â = A ×₃ M``: every tube ``a`` becomes ``M a``), and

    A ⋆M B = (Â △ B̂) ×₃ M⁻¹,      (Â △ B̂)[:, :, k] = Â[:, :, k] @ B̂[:, :, k]   (facewise products),

for ``A (p, s, n)``, ``B (s, q, n)`` -> ``(p, q, n)``. Leading batch dimensions are allowed everywhere:
``(..., p, s, n)``. Transforms (:func:`transform`): orthonormal DCT-II (``"dct"``, the default), the DFT (``"dft"``:
the classic t-product, circular convolution of tubes; complex arithmetic stays inside, real inputs give real
results), the identity (``n`` independent matrix products), a random orthogonal matrix (``"orthogonal"``), the
data-driven ``"data"`` transform (``Uᵀ`` with ``U`` the left singular vectors of the mode-3 unfolding of training
data) and any invertible user matrix (inverted by a solve, never an explicit inverse).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ._dtypes import half_to_float

__all__ = ["Transform", "transform", "mprod", "mtran", "t_eye", "t_svd", "t_svd_truncate", "facewise",
           "TRANSFORMS", "dct_matrix"]

TRANSFORMS = ("dct", "dft", "identity", "orthogonal", "data")
# tubes at least this long use the FFT-based DCT instead of the n × n matrix (measured in the t-linear layer, where
# the matrix form also changes the layout for free: at n = 64 / 128 / 256 the matrix form is 7× / 6× / 3× faster)
_FAST_DCT_MIN = 512


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C (n, n)``: ``(C a)_k = s_k Σ_j a_j cos(π k (2j + 1) / 2n)``."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    C = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C.to(dtype)


def _dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim in ``O(n log n)`` (Makhoul's reordering + one FFT)."""
    dtype, x = x.dtype, half_to_float(x)
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    V = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, dtype=x.dtype, device=x.device)
    w = torch.exp(-1j * math.pi * k / (2 * n))
    out = (V * w).real * math.sqrt(2.0 / n)
    out[..., 0] = out[..., 0] / math.sqrt(2.0)
    return out.to(dtype)


def _idct_fft(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_dct_fft` (the orthonormal DCT-III)."""
    dtype, y = y.dtype, half_to_float(y)
    n = y.shape[-1]
    k = torch.arange(n, dtype=y.dtype, device=y.device)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=y.dtype, device=y.device)
    scale[0] = math.sqrt(1.0 / n)
    c = (y * scale) * torch.exp(1j * math.pi * k / (2 * n))
    v = torch.fft.ifft(c, dim=-1).real * n
    x = torch.empty_like(y)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x.to(dtype)


def _parts(real_map, x: torch.Tensor) -> torch.Tensor:
    """A real linear map of the last dim applied to a real tensor, or to a complex one's real and imaginary parts."""
    return torch.complex(real_map(x.real), real_map(x.imag)) if x.is_complex() else real_map(x)


@dataclass(frozen=True, eq=False)
class Transform:
    """An invertible transform of tubes of length ``n``: ``forward (..., n) -> (..., n)`` and its inverse.

    ``matrix`` is ``M`` (``None`` for the identity and the DFT); ``orthogonal`` transforms are inverted with
    ``Mᵀ``, others with a solve. The DFT maps real tubes to complex ones (its inverse returns the real part).
    """

    name: str
    n: int
    matrix: torch.Tensor | None = None
    orthogonal: bool = True

    @property
    def is_complex(self) -> bool:
        return self.name == "dft"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x ×₃ M`` along the last dim."""
        if self.name == "identity":
            return x
        if self.name == "dft":
            return torch.fft.fft(half_to_float(x), dim=-1)
        if self.name == "dct" and self.matrix is None:
            return _parts(_dct_fft, x)
        return x @ self._m(x).T

    def inverse(self, y: torch.Tensor, real: bool = True) -> torch.Tensor:
        """``y ×₃ M⁻¹`` along the last dim. ``real``: the result is known to be real (the product of real tensors),
        so the DFT's inverse returns its real part; ``False`` for complex operands."""
        if self.name == "identity":
            return y
        if self.name == "dft":
            x = torch.fft.ifft(y, dim=-1)
            return x.real if real else x
        if self.name == "dct" and self.matrix is None:
            return _parts(_idct_fft, y)
        M = self._m(y)
        if self.orthogonal:
            return y @ M
        # x Mᵀ = y  ⇔  M xᵀ = yᵀ: a solve, never an explicit inverse
        x = torch.linalg.solve(half_to_float(M), half_to_float(y).reshape(-1, self.n).T).T.reshape(y.shape)
        return x.to(y.dtype)

    def _m(self, like: torch.Tensor) -> torch.Tensor:
        M = self.matrix
        return M if M.dtype == like.dtype and M.device == like.device else M.to(like.dtype).to(like.device)


def transform(spec: str | torch.Tensor | Transform = "dct", n: int | None = None, *, data: torch.Tensor | None = None,
              seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> Transform:
    """The transform named by ``spec`` for tubes of length ``n``.

    ``spec``: ``"dct"`` (matrix form below 512, FFT-based above), ``"dft"``, ``"identity"``, ``"orthogonal"``
    (QR of a Gaussian, seeded), ``"data"`` (needs ``data (..., n)``: ``M = Uᵀ`` from the SVD of the tubes stacked
    as columns), an invertible ``(n, n)`` tensor, or a :class:`Transform` (returned as is).
    """
    if isinstance(spec, Transform):
        if n is not None and spec.n != n:
            raise ValueError(f"the transform is for tubes of length {spec.n}, not n={n}")
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 2 or spec.shape[0] != spec.shape[1] or (n is not None and spec.shape[0] != n):
            raise ValueError(f"M has shape {tuple(spec.shape)}: expected a square ({n}, {n}) matrix")
        if not bool(torch.isfinite(spec).all()):
            raise ValueError("M holds NaN or infinite values")
        if spec.is_complex():
            raise ValueError(f"M has dtype {spec.dtype}: a user transform must be a real matrix (for the discrete "
                             f"Fourier transform pass M='dft')")
        M = spec.detach().to(dtype=spec.dtype if spec.is_floating_point() else dtype).contiguous()
        if torch.linalg.matrix_rank(M.double()) < M.shape[0]:
            raise ValueError("M is singular: the ⋆M product needs an invertible transform")
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        orthogonal = bool(torch.allclose(M @ M.T, eye, atol=1e-10 if M.dtype == torch.float64 else 1e-5))
        return Transform("matrix", M.shape[0], M, orthogonal)
    if spec not in TRANSFORMS:
        raise ValueError(f"M={spec!r} is not allowed: expected one of {', '.join(map(repr, TRANSFORMS))} or an "
                         f"invertible (n, n) tensor")
    if spec == "data":
        if data is None:
            raise ValueError("M='data' needs data=(..., n) tubes of training data to take the singular vectors of")
        n = data.shape[-1] if n is None else n
        if data.shape[-1] != n:
            raise ValueError(f"data has tubes of length {data.shape[-1]}, not n={n}")
        tubes = data.reshape(-1, n).T.to(dtype)  # (n, rows)
        # U is n × n either way; the full SVD would also make the rows × rows V (627 GB for 10k 28×28 images), so it
        # only runs when there are fewer rows than n (then the reduced U would not be square)
        U = torch.linalg.svd(tubes, full_matrices=tubes.shape[1] < n)[0]
        return Transform("data", n, U.T.contiguous().to(device))
    if n is None or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed: expected the tube length, a positive integer")
    if spec == "identity" or spec == "dft":
        return Transform(spec, n)
    if spec == "dct":
        return Transform("dct", n, None if n >= _FAST_DCT_MIN else dct_matrix(n, dtype, device))
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Transform("orthogonal", n, (Q * torch.sign(torch.diagonal(R))).to(dtype).to(device).contiguous())


def _resolve(M, n: int, like: torch.Tensor) -> Transform:
    return transform(M, n, dtype=like.dtype if like.is_floating_point() else torch.float64, device=like.device)


def _operands(**tensors: torch.Tensor) -> list[torch.Tensor]:
    """The operands of a ⋆M operation at their common dtype (``torch.promote_types``), after checking that they are
    floating-point or complex tensors (the transforms are not integer maps)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name} has dtype {t.dtype}: the ⋆M operations need floating-point or complex tensors "
                            f"(convert with .float() or .double())")
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors.values()])
    return [t.to(dtype) for t in tensors.values()]


def _check_third_order(A: torch.Tensor) -> None:
    if A.dim() < 3:
        raise ValueError(f"A must be a third-order tensor (..., rows, cols, n); got shape {tuple(A.shape)}")


def facewise(A_hat: torch.Tensor, B_hat: torch.Tensor) -> torch.Tensor:
    """Frontal-slice products in the transform domain: ``(..., p, s, n) △ (..., s, q, n) -> (..., p, q, n)`` as one
    batched matmul over the ``n`` slices."""
    return (A_hat.movedim(-1, -3) @ B_hat.movedim(-1, -3)).movedim(-3, -1)


def mprod(A: torch.Tensor, B: torch.Tensor, M: str | torch.Tensor | Transform = "dct") -> torch.Tensor:
    """``A ⋆M B``: ``A (..., p, s, n)``, ``B (..., s, q, n)`` -> ``(..., p, q, n)``."""
    A, B = _operands(A=A, B=B)
    if A.dim() < 3 or B.dim() < 3:
        raise ValueError(f"A and B must be third-order tensors (..., rows, cols, n); got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if A.shape[-1] != B.shape[-1] or A.shape[-2] != B.shape[-3]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not chain: need A (p, s, n), B (s, q, n)")
    T = _resolve(M, A.shape[-1], A)
    out = T.inverse(facewise(T.forward(A), T.forward(B)), real=not A.is_complex())
    return out if out.dtype == A.dtype else out.to(A.dtype)  # (half precision: the FFTs ran in float32)


def mtran(A: torch.Tensor, M: str | torch.Tensor | Transform = "dct") -> torch.Tensor:
    """The ⋆M transpose ``(..., p, s, n) -> (..., s, p, n)``: every frontal slice (conjugate-)transposed in the
    transform domain, so that ``(A ⋆M B)ᵀ = Bᵀ ⋆M Aᵀ``. For orthogonal real ``M`` this is the slice-wise transpose."""
    A, = _operands(A=A)
    _check_third_order(A)
    T = _resolve(M, A.shape[-1], A)
    if T.orthogonal and not T.is_complex and not A.is_complex():
        return A.transpose(-3, -2)
    return T.inverse(T.forward(A).transpose(-3, -2).conj(), real=not A.is_complex())


def t_eye(p: int, M: str | torch.Tensor | Transform, n: int | None = None, *, dtype=torch.float64,
          device=None) -> torch.Tensor:
    """The identity tensor ``(p, p, n)``: identity matrices in every slice of the transform domain."""
    T = transform(M, n, dtype=dtype, device=device)
    eye = torch.eye(p, dtype=dtype, device=device).unsqueeze(-1).expand(p, p, T.n)
    return T.inverse(eye.to(torch.complex128 if T.is_complex and dtype == torch.float64 else
                            torch.complex64 if T.is_complex else dtype))


def t_svd(A: torch.Tensor, M: str | torch.Tensor | Transform = "dct"):
    """``A = U ⋆M S ⋆M Vᵀ``: returns ``(U (p, k, n), S (k, k, n), V (s, k, n))``, ``k = min(p, s)``, from the
    SVDs of the frontal slices in the transform domain (``S`` is f-diagonal there)."""
    A, = _operands(A=A)
    _check_third_order(A)
    T = _resolve(M, A.shape[-1], A)
    Ah = T.forward(A).movedim(-1, -3)  # (..., n, p, s)
    U, s, Vh = torch.linalg.svd(Ah, full_matrices=False)
    S = torch.diag_embed(s).to(U.dtype)
    back = [T.inverse(t.movedim(-3, -1), real=not A.is_complex()) for t in (U, S, Vh.transpose(-1, -2).conj())]
    return tuple(back)


def t_svd_truncate(A: torch.Tensor, rank: int, M: str | torch.Tensor | Transform = "dct") -> torch.Tensor:
    """The tubal-rank-``rank`` truncation of ``A``: each transform-domain slice cut to its ``rank`` largest singular
    values. For an orthogonal ``M`` (or the DFT) it is the best approximation of tubal rank ≤ ``rank`` in the
    Frobenius norm (Kilmer et al.'s Eckart–Young theorem)."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank={rank!r} is not allowed: expected an integer >= 0")
    A, = _operands(A=A)
    _check_third_order(A)
    T = _resolve(M, A.shape[-1], A)
    Ah = T.forward(A).movedim(-1, -3)
    U, s, Vh = torch.linalg.svd(Ah, full_matrices=False)
    r = min(rank, s.shape[-1])
    approx = (U[..., :r] * s[..., None, :r].to(U.dtype)) @ Vh[..., :r, :]
    return T.inverse(approx.movedim(-3, -1), real=not A.is_complex())
