"""Token mixers of the Deep Tensor Network family, one constructor signature: ``(dim, heads, causal=True, …)``,
``(batch, n, dim) -> (batch, n, dim)``, and ``step(x_t, state) -> (y_t, state)`` for incremental decoding.

The math lives in :mod:`torchtn.core.attention`; these modules hold the projections. Per head, ``q, k, v`` are
``(batch, heads, n, dim // heads)``.

* :class:`TensorAttention` — second-order Tensor Attention (a reconstruction of arXiv 2311.11091 v3 from its
  abstract and the same author's Higher-order Linear Attention; see ``docs/reproductions/dtn.md``): ``O(d²)`` state
  and work per token.
* :class:`LinearAttention` — first-order (kernel) linear attention, ``elu + 1`` features: ``O(d e)`` per token.
* :class:`SoftmaxAttention` — dot-product attention (PyTorch's fused kernel); ``step`` keeps a KV cache.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from ..core.attention import (
    check_attention_options,
    linear_attention,
    linear_attention_step,
    softmax_attention,
    softmax_attention_step,
    tensor_attention,
    tensor_attention_step,
)

__all__ = ["TensorAttention", "LinearAttention", "SoftmaxAttention", "ATTENTIONS"]


class _Attention(nn.Module):
    """Shared projections: ``x -> q, k, v`` per head, the mixer of the subclass, the output projection."""

    def __init__(self, dim: int, heads: int = 1, causal: bool = True, *, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads={heads} is not allowed: it must divide dim={dim}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal={causal!r} is not allowed: expected True or False")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **kw)
        self.out = nn.Linear(dim, dim, bias=bias, **kw)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., dim) -> 3 × (..., heads, head_dim)`` (features of the token), before the mixer's maps."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return tuple(t.unflatten(-1, (self.heads, self.head_dim)) for t in (q, k, v))

    def _check_input(self, x: torch.Tensor, ndim: int, what: str) -> None:
        if x.dim() != ndim or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {what} with dim={self.dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, n, dim) -> (batch, n, dim)``."""
        self._check_input(x, 3, "(batch, n, dim)")
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # (batch, heads, n, head_dim)
        y = self.mix(*self.features(q, k), v)
        return self.out(self.post(y).transpose(1, 2).flatten(2))

    def step(self, x_t: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """One token ``(batch, dim) -> (batch, dim)`` and the new state (``state=None`` starts a sequence); the
        outputs equal ``forward``'s on the whole sequence."""
        if not self.causal:
            raise ValueError("step() needs causal=True: a bidirectional layer sees tokens that have not come yet")
        self._check_input(x_t, 2, "(batch, dim)")
        q, k, v = self._heads(x_t)  # (batch, heads, head_dim)
        y, state = self.mix_step(*self.features(q, k), v, state)
        return self.out(self.post(y).flatten(1)), state

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A whole prompt ``(batch, n, dim)`` at training speed, and the state to continue it with :meth:`step`."""
        self._check_input(x, 3, "(batch, n, dim)")
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))
        y, state = self.mix(*self.features(q, k), v, return_state=True)
        return self.out(self.post(y).transpose(1, 2).flatten(2)), state

    # what subclasses define
    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def post(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def mix(self, q, k, v, return_state=False):  # pragma: no cover - abstract
        raise NotImplementedError

    def mix_step(self, q, k, v, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}"


class TensorAttention(_Attention):
    """Second-order Tensor Attention, ``(batch, n, dim) -> (batch, n, dim)``.

    ``masked=True`` (default): the strictly masked form ``o_t = Σ_{i≤j≤t} (q_t·k_i)(k_i·q_j) v_j``; ``False``: the
    simple causal ``q_tᵀ S_t C_t``. ``normalize``: divide by the same sum with ``v ≡ 1``. ``decay`` γ ∈ (0, 1],
    ``ridge`` λ ≥ 0 (``S + λI``). ``form``: ``"auto"`` (the planner: chunk size or token loop), ``"chunked"``,
    ``"recurrent"``, ``"parallel"``; ``chunk_size`` forces a chunk. Queries and keys are L2-normalized per head
    (``qk_norm``; a degree-2 kernel of unnormalized vectors grows as |q|²|k|²) and the mixed values are
    RMS-normalized per head (``out_norm``; the unnormalized sums grow with the position). Both are on by default and
    are part of the layer, not of the reconstructed operator.
    """

    def __init__(self, dim: int, heads: int = 1, causal: bool = True, *, masked: bool = True,
                 normalize: bool = False, decay: float | None = None, ridge: float = 0.0, eps: float = 1e-6,
                 form: str = "auto", chunk_size: int | None = None, qk_norm: bool = True, out_norm: bool = True,
                 bias: bool = False, device=None, dtype=None) -> None:
        check_attention_options(causal=causal, decay=decay, ridge=ridge, eps=eps, form=form, chunk_size=chunk_size)
        super().__init__(dim, heads, causal, bias=bias, device=device, dtype=dtype)
        self.opts = dict(masked=masked, normalize=normalize, decay=decay, ridge=ridge, eps=eps)
        self.form, self.chunk_size, self.qk_norm = form, chunk_size, qk_norm
        self.norm = nn.RMSNorm(self.head_dim, device=device, dtype=dtype) if out_norm else None

    def features(self, q, k):
        return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if self.qk_norm else (q, k)

    def post(self, y):
        return self.norm(y) if self.norm is not None else y

    def mix(self, q, k, v, return_state=False):
        return tensor_attention(q, k, v, causal=self.causal, form=self.form, chunk_size=self.chunk_size,
                                return_state=return_state, **self.opts)

    def mix_step(self, q, k, v, state):
        return tensor_attention_step(q, k, v, state, **self.opts)


class LinearAttention(_Attention):
    """Causal linear attention with ``φ(x) = elu(x) + 1`` features (Katharopoulos et al.), normalized by default:
    ``o_t = Σ_{i≤t} γ^{t−i} (φ(q_t)·φ(k_i)) v_i / Σ_{i≤t} γ^{t−i} φ(q_t)·φ(k_i)``."""

    def __init__(self, dim: int, heads: int = 1, causal: bool = True, *, normalize: bool = True,
                 decay: float | None = None, eps: float = 1e-6, form: str = "auto", chunk_size: int | None = None,
                 bias: bool = False, device=None, dtype=None) -> None:
        check_attention_options(causal=causal, decay=decay, eps=eps, form=form, chunk_size=chunk_size)
        super().__init__(dim, heads, causal, bias=bias, device=device, dtype=dtype)
        self.opts = dict(normalize=normalize, decay=decay, eps=eps)
        self.form, self.chunk_size = form, chunk_size

    def features(self, q, k):
        return F.elu(q) + 1, F.elu(k) + 1

    def mix(self, q, k, v, return_state=False):
        return linear_attention(q, k, v, causal=self.causal, form=self.form, chunk_size=self.chunk_size,
                                return_state=return_state, **self.opts)

    def mix_step(self, q, k, v, state):
        return linear_attention_step(q, k, v, state, **self.opts)


class SoftmaxAttention(_Attention):
    """Dot-product attention ``softmax(q kᵀ / √d) v`` per head (the quadratic baseline; ``step`` keeps a KV cache
    whose size grows with the sequence)."""

    def mix(self, q, k, v, return_state=False):
        return softmax_attention(q, k, v, causal=self.causal, return_state=return_state)

    def mix_step(self, q, k, v, state):
        return softmax_attention_step(q, k, v, state)


ATTENTIONS: dict[str, type[_Attention]] = {"tensor": TensorAttention, "linear": LinearAttention,
                                           "softmax": SoftmaxAttention}
