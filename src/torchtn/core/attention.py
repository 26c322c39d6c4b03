"""Attention as tensor-network contractions: second-order Tensor Attention, linear attention, softmax attention.

Pure functions on per-head tensors ``q, k (..., n, d)``, ``v (..., n, e)`` (leading dims: batch, heads) returning
``(..., n, e)``. Tensor Attention (Deep Tensor Network, arXiv 2311.11091 v3, as reconstructed in
``shared/spec/dtn.md`` from the same author's Higher-order Linear Attention) mixes tokens through the second-order
prefix summaries

    S_t = Σ_{i≤t} k_i k_iᵀ (d×d),   C_t = Σ_{j≤t} q_j v_jᵀ (d×e),   m_t = Σ_{j≤t} q_j,
    G_t = G_{t−1} + k_t k_tᵀ C_{t−1},   h_t = h_{t−1} + k_t k_tᵀ m_{t−1},

and never forms an ``n × n`` matrix outside a chunk. Its output, for every form below:

* strictly masked (default): ``o_t = q_tᵀ (S_t C_t − G_t) = Σ_{i≤j≤t} (q_t·k_i)(k_i·q_j) v_j``, i.e. row ``t`` of
  ``((L⊙QKᵀ)(L⊙QKᵀ)ᵀ ⊙ L) V`` with ``L`` the lower-triangular ones;
* simple causal (``masked=False``): ``o_t = q_tᵀ S_t C_t = Σ_{i≤t, j≤t} (q_t·k_i)(k_i·q_j) v_j``;
* bidirectional (``causal=False``): ``O = Q (KᵀK) (QᵀV)``;
* ``normalize=True`` divides by the same expression with ``v ≡ 1`` (plus ``eps``);
* ``decay=γ``: every summary forgets by ``γ`` per token — ``S, C, m`` by ``γ``, their products ``G, h`` by ``γ²``
  — so the masked identity still holds with weights: ``o_t = Σ_{i≤j≤t} γ^{(t−i)+(t−j)} (q_t·k_i)(k_i·q_j) v_j``;
* ``ridge=λ`` uses ``S_t + λI`` (adds ``λ Σ_{j≤t} γ^{t−j} (q_t·q_j) v_j``; no longer the exact masked form).

Three forms compute it: ``"parallel"`` (the explicit ``n × n`` products: the reference, ``O(n³)``),
``"recurrent"`` (a token loop over :class:`TensorAttentionState`: ``O(d²)`` state and work per token — what
incremental decoding uses) and ``"chunked"`` (training: exact masked products inside chunks of ``c`` tokens and an
exclusive scan of chunk summaries between them, combined associatively by :func:`combine_summaries`; ``O(n (c² +
d²))`` work). ``"auto"`` asks the planner (:mod:`.contraction`), which prices chunk sizes and the token loop with the
device's cost model and can time them (autotuning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import check_nonnegative_real
from ._tracing import size_hint
from .contraction.autotune import time_call
from .contraction.cost import CostModel
from .contraction.planner import MeasuredPlan, make_plan, register_strategy

__all__ = ["TensorAttentionState", "LinearAttentionState", "SoftmaxAttentionState", "tensor_attention",
           "tensor_attention_step", "linear_attention", "linear_attention_step", "softmax_attention",
           "softmax_attention_step", "combine_summaries", "chunk_summaries", "AttentionPlan", "plan_attention",
           "check_attention_options"]

Form = Literal["auto", "parallel", "chunked", "recurrent"]
FORMS = ("auto", "parallel", "chunked", "recurrent")
KIND = "attention"


# ----------------------------------------------------------------------------------------------------------- states
@dataclass
class TensorAttentionState:
    """Prefix summaries of Tensor Attention after ``length`` tokens (per batch and head; ``G``, ``h`` only when
    masked). Its size is ``O(d² + d e)`` whatever the length."""

    S: torch.Tensor  # (..., d, d)   Σ γ^{t−i} k_i k_iᵀ
    C: torch.Tensor  # (..., d, e)   Σ γ^{t−j} q_j v_jᵀ
    m: torch.Tensor  # (..., d)      Σ γ^{t−j} q_j
    G: torch.Tensor  # (..., d, e)   Σ_{j<i} γ^{(t−i)+(t−j)} k_i k_iᵀ q_j v_jᵀ
    h: torch.Tensor  # (..., d)      Σ_{j<i} γ^{(t−i)+(t−j)} k_i k_iᵀ q_j
    length: int = 0

    @classmethod
    def zeros(cls, lead: tuple, d: int, e: int, like: torch.Tensor) -> "TensorAttentionState":
        z = like.new_zeros
        return cls(z(*lead, d, d), z(*lead, d, e), z(*lead, d), z(*lead, d, e), z(*lead, d), 0)

    def numel(self) -> int:
        """Elements held (independent of ``length``)."""
        return sum(getattr(self, f.name).numel() for f in fields(self) if f.name != "length")


@dataclass
class LinearAttentionState:
    """Prefix summaries of linear attention: ``S = Σ γ^{t−i} k_i v_iᵀ`` and ``z = Σ γ^{t−i} k_i``."""

    S: torch.Tensor  # (..., d, e)
    z: torch.Tensor  # (..., d)
    length: int = 0

    def numel(self) -> int:
        return self.S.numel() + self.z.numel()


@dataclass
class SoftmaxAttentionState:
    """The KV cache of softmax attention: every key and value so far (grows with the length)."""

    k: torch.Tensor  # (..., t, d)
    v: torch.Tensor  # (..., t, e)

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def numel(self) -> int:
        return self.k.numel() + self.v.numel()


# ------------------------------------------------------------------------------------------------------------ checks
def check_attention_options(*, causal: bool = True, decay: float | None = None, ridge: float = 0.0,
                            eps: float = 1e-6, form: str = "auto", chunk_size: int | None = None) -> None:
    """Raise ``ValueError`` naming the first option that is not allowed (the kernels and the modules both call it)."""
    if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
        raise ValueError(f"decay={decay!r} is not allowed: expected None or a number in (0, 1]")
    if decay is not None and not causal:
        raise ValueError(f"decay={decay!r} needs causal=True (a decay orders the tokens)")
    check_nonnegative_real("ridge", ridge)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r} is not allowed: expected a number > 0")
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not allowed: expected one of {', '.join(map(repr, FORMS))}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed: expected a positive integer or None")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: float | None, ridge: float, eps: float,
           form: str, causal: bool, chunk_size: int | None = None) -> None:
    if q.dim() < 2 or q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (..., n, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must be (..., n, e) with the leading dims of q {tuple(q.shape[:-1])}; got "
                         f"{tuple(v.shape)}")
    check_attention_options(causal=causal, decay=decay, ridge=ridge, eps=eps, form=form, chunk_size=chunk_size)


def _decay_mask(n: int, decay: float | None, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``D[t, i] = γ^{t−i}`` for ``i ≤ t`` (``L`` when ``γ`` is None), else 0: ``(n, n)``."""
    idx = torch.arange(n, device=like.device)
    diff = idx[:, None] - idx[None, :]
    lower = diff >= offset
    if decay is None or decay == 1:
        return lower.to(like.dtype)
    return torch.where(lower, torch.tensor(decay, dtype=like.dtype, device=like.device) ** diff.clamp(min=0),
                       torch.zeros((), dtype=like.dtype, device=like.device))


def _ones_column(v: torch.Tensor) -> torch.Tensor:
    return v.new_ones(*v.shape[:-1], 1)


# ---------------------------------------------------------------------------------------------------- tensor: forms
def _tensor_parallel(q, k, v, causal, masked, normalize, decay, ridge, eps):
    """The explicit ``n × n`` computation (reference; ``O(n³)`` when masked)."""
    if not causal:
        metric = k.transpose(-1, -2) @ k
        if ridge:
            metric = metric + ridge * torch.eye(metric.shape[-1], dtype=q.dtype, device=q.device)
        qm = q @ metric
        num = qm @ (q.transpose(-1, -2) @ v)
        if not normalize:
            return num
        return num / (qm @ q.sum(-2, keepdim=True).transpose(-1, -2) + eps)
    n = q.shape[-2]
    D = _decay_mask(n, decay, q)
    qk = q @ k.transpose(-1, -2)
    right = qk * _decay_mask(n, None, q) if masked else qk  # (q_j·k_i), restricted to i ≤ j when masked
    M = ((qk * D) @ right.transpose(-1, -2)) * D
    if ridge:
        M = M + ridge * (q @ q.transpose(-1, -2)) * D
    num = M @ v
    return num / (M.sum(-1, keepdim=True) + eps) if normalize else num


def tensor_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                          state: TensorAttentionState | None = None, *, masked: bool = True, normalize: bool = False,
                          decay: float | None = None, ridge: float = 0.0, eps: float = 1e-6
                          ) -> tuple[torch.Tensor, TensorAttentionState]:
    """One token: ``q_t, k_t (..., d)``, ``v_t (..., e)`` -> ``(o_t (..., e), new state)``; ``O(d² + d e)`` work.

    ``state=None`` starts a new sequence. The state passed in is not modified.
    """
    check_state(state, TensorAttentionState, q_t, v_t)
    if state is None:
        state = TensorAttentionState.zeros(tuple(q_t.shape[:-1]), q_t.shape[-1], v_t.shape[-1], q_t)
    g = 1.0 if decay is None else float(decay)
    kt = k_t.unsqueeze(-1)  # (..., d, 1)
    S = g * state.S + kt * k_t.unsqueeze(-2)
    C = g * state.C + q_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    m = g * state.m + q_t
    if masked:  # G_t = γ² G + k_t (k_tᵀ γ C_{t−1}), the pairs i > j that S_t C_t counts and the mask excludes
        G = g * g * state.G + kt * (g * (k_t.unsqueeze(-2) @ state.C))
        h = g * g * state.h + k_t * (g * (k_t * state.m).sum(-1, keepdim=True))
    else:
        G, h = state.G, state.h
    u = (q_t.unsqueeze(-2) @ S).squeeze(-2)  # q_tᵀ S_t first: O(d²)
    if ridge:
        u = u + ridge * q_t
    num = (u.unsqueeze(-2) @ C).squeeze(-2)
    if masked:
        num = num - (q_t.unsqueeze(-2) @ G).squeeze(-2)
    if normalize:
        den = (u * m).sum(-1, keepdim=True)
        if masked:
            den = den - (q_t * h).sum(-1, keepdim=True)
        num = num / (den + eps)
    return num, TensorAttentionState(S, C, m, G, h, state.length + 1)


def _tensor_recurrent(q, k, v, masked, normalize, decay, ridge, eps, state=None):
    outs = []
    for t in range(q.shape[-2]):
        o, state = tensor_attention_step(q[..., t, :], k[..., t, :], v[..., t, :], state, masked=masked,
                                         normalize=normalize, decay=decay, ridge=ridge, eps=eps)
        outs.append(o)
    return torch.stack(outs, dim=-2), state


def chunk_summaries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: float | None = None,
                    masked: bool = True) -> TensorAttentionState:
    """The summaries of one chunk of tokens ``(..., c, ·)`` on their own (the state after it, from zeros)."""
    c = q.shape[-2]
    w = _end_weights(c, decay, q)  # γ^{end−i}
    kw, qw = k * w.unsqueeze(-1), q * w.unsqueeze(-1)
    S = kw.transpose(-1, -2) @ k
    C = qw.transpose(-1, -2) @ v
    m = qw.sum(-2)
    if masked:
        strict = _decay_mask(c, None, q, offset=1)  # j < i
        P = (kw @ qw.transpose(-1, -2)) * strict  # (i, j): γ^{end−i}γ^{end−j} k_i·q_j, j < i
        G = k.transpose(-1, -2) @ (P @ v)
        h = (k.transpose(-1, -2) @ P.sum(-1, keepdim=True)).squeeze(-1)
    else:
        G, h = torch.zeros_like(C), torch.zeros_like(m)
    return TensorAttentionState(S, C, m, G, h, c)


def _end_weights(c: int, decay: float | None, like: torch.Tensor) -> torch.Tensor:
    if decay is None or decay == 1:
        return like.new_ones(c)
    return torch.tensor(decay, dtype=like.dtype, device=like.device) ** torch.arange(
        c - 1, -1, -1, device=like.device, dtype=like.dtype)


def combine_summaries(a: TensorAttentionState, b: TensorAttentionState, decay: float | None = None
                      ) -> TensorAttentionState:
    """The summaries of the tokens of ``a`` followed by those of ``b`` (associative):
    ``(S_A γᴸ + S_B, C_A γᴸ + C_B, m_A γᴸ + m_B, G_A γ²ᴸ + G_B + S_B C_A γᴸ, h_A γ²ᴸ + h_B + S_B m_A γᴸ)`` with
    ``L`` the length of ``b``."""
    g = 1.0 if decay is None else float(decay) ** b.length
    return TensorAttentionState(
        g * a.S + b.S, g * a.C + b.C, g * a.m + b.m,
        g * g * a.G + b.G + b.S @ (g * a.C),
        g * g * a.h + b.h + (b.S @ (g * a.m).unsqueeze(-1)).squeeze(-1),
        a.length + b.length)


def _exclusive_scan(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``out[c] = factor·out[c−1] + x[c−1]``, ``out[0] = 0``, along dim ``-3`` (chunks) of ``(..., nc, a, b)``."""
    if factor == 1.0:
        return torch.cumsum(x, dim=-3) - x
    outs, acc = [], torch.zeros_like(x[..., 0, :, :])
    for c in range(x.shape[-3]):
        outs.append(acc)
        acc = factor * acc + x[..., c, :, :]
    return torch.stack(outs, dim=-3)


def _chunk_layout(n: int, chunk: int) -> tuple[int, int, int]:
    """``(c, nc, pad)``: ``n`` tokens in ``nc`` chunks of ``c`` (at most ``chunk``), the last padded by ``pad`` zero
    tokens."""
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    return c, nc, nc * c - n


def _tensor_chunked(q, k, v, masked, normalize, decay, ridge, eps, chunk):
    """Exact chunk-scan form (causal); returns ``(out, state after the last token)``."""
    *lead, n, d = q.shape
    e = v.shape[-1]
    c, nc, pad = _chunk_layout(n, chunk)
    v1 = torch.cat([v, _ones_column(v)], dim=-1)  # the last value column (v ≡ 1) carries m, h and the denominator
    if pad:  # zero tokens at the end change no earlier output
        q, k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
    Q, K, V = (t.reshape(*lead, nc, c, t.shape[-1]) for t in (q, k, v1))
    local = chunk_summaries(Q, K, V, decay, masked)  # every chunk on its own: (..., nc, ·)
    gL = 1.0 if decay is None else float(decay) ** c
    # the state before each chunk: an exclusive scan of the chunk summaries (combine_summaries, vectorized)
    S0 = _exclusive_scan(local.S, gL)
    C0 = _exclusive_scan(local.C, gL)
    G0 = _exclusive_scan(local.G + local.S @ (gL * C0), gL * gL) if masked else None
    # inside each chunk (rows t, τ = position in the chunk, 1-based):
    #   o_t = q_tᵀ[γ^{2τ}(S0C0 − G0) + γ^τ S0 C_loc,t + (S_loc,t C_loc,t − G_loc,t)]   (masked: S_loc C0 cancels)
    g1 = torch.ones(c, dtype=q.dtype, device=q.device) if decay is None else decay ** torch.arange(
        1, c + 1, dtype=q.dtype, device=q.device)
    D = _decay_mask(c, decay, q)
    qk = Q @ K.transpose(-1, -2)
    right = qk * _decay_mask(c, None, q) if masked else qk
    M = (qk * D) @ right.transpose(-1, -2) + g1[:, None] * ((Q @ S0) @ Q.transpose(-1, -2))
    if ridge:
        M = M + ridge * (Q @ Q.transpose(-1, -2))
    out = (M * D) @ V + (g1 * g1)[:, None] * (Q @ (S0 @ C0 - G0 if masked else S0 @ C0))
    if ridge:
        out = out + ridge * g1[:, None] * (Q @ C0)
    if not masked:  # the chunk's own keys meet the values before it: γ^τ q_tᵀ S_loc,t C0
        out = out + g1[:, None] * (((qk * D) @ K) @ C0)
    out = out.reshape(*lead, nc * c, e + 1)[..., :n, :]
    # the state after the last real token (for incremental decoding after a prompt)
    tail = chunk_summaries(Q[..., -1, :c - pad, :], K[..., -1, :c - pad, :], V[..., -1, :c - pad, :], decay, masked)
    before = TensorAttentionState(S0[..., -1, :, :], C0[..., -1, :, :], C0[..., -1, :, e],
                                  G0[..., -1, :, :] if masked else torch.zeros_like(C0[..., -1, :, :]),
                                  G0[..., -1, :, e] if masked else torch.zeros_like(C0[..., -1, :, e]), (nc - 1) * c)
    tail = TensorAttentionState(tail.S, tail.C, tail.C[..., e], tail.G, tail.G[..., e], c - pad)
    final = combine_summaries(before, tail, decay)
    final = replace(final, C=final.C[..., :e], G=final.G[..., :e])
    if not masked:  # the simple causal form keeps no correction summaries
        final = replace(final, G=torch.zeros_like(final.G), h=torch.zeros_like(final.h))
    num = out[..., :e]
    return (num / (out[..., e:] + eps) if normalize else num), final


def tensor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, masked: bool = True,
                     normalize: bool = False, decay: float | None = None, ridge: float = 0.0, eps: float = 1e-6,
                     form: Form = "auto", chunk_size: int | None = None, cost_model: CostModel | None = None,
                     return_state: bool = False):
    """Second-order Tensor Attention: ``q, k (..., n, d)``, ``v (..., n, e)`` -> ``(..., n, e)``.

    See the module docstring for the definition and the options. ``form`` picks the computation (``"auto"``: the
    planner's choice among chunk sizes and the token loop; ``chunk_size`` forces a chunk size). With
    ``return_state`` (causal only) also returns the :class:`TensorAttentionState` after the last token, so that
    :func:`tensor_attention_step` can continue the sequence.
    """
    _check(q, k, v, decay, ridge, eps, form, causal, chunk_size)
    opts = dict(masked=masked, normalize=normalize, decay=decay, ridge=ridge, eps=eps)
    if causal and q.shape[-2] == 0:
        return _empty(v, return_state)
    if not causal:
        if return_state:
            raise ValueError("return_state=True needs causal=True (a bidirectional layer has no running state)")
        return _tensor_parallel(q, k, v, False, **opts)
    if form == "auto" or (form == "chunked" and chunk_size is None):
        plan = plan_attention("tensor", q, v, masked=masked, cost_model=cost_model, force=form,
                              chunk_size=chunk_size)
        form, chunk_size = plan.form, plan.chunk
    if form == "parallel":
        out = _tensor_parallel(q, k, v, True, **opts)
        if not return_state:
            return out
        _, state = _tensor_chunked(q, k, v, chunk=q.shape[-2], **opts)
        return out, state
    if form == "recurrent":
        out, state = _tensor_recurrent(q, k, v, **opts)
    else:
        out, state = _tensor_chunked(q, k, v, chunk=int(chunk_size), **opts)
    return (out, state) if return_state else out


def _empty(v: torch.Tensor, return_state: bool):
    """A causal mix of an empty sequence: the empty output ``(..., 0, e)`` (``v`` itself has that shape; cloned, so
    gradients still reach it) and — for ``return_state`` — the state of no tokens, ``None``, where ``*_step`` starts."""
    return (v.clone(), None) if return_state else v.clone()


# ---------------------------------------------------------------------------------------------------------- linear
def linear_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                          state: LinearAttentionState | None = None, *, normalize: bool = True,
                          decay: float | None = None, eps: float = 1e-6) -> tuple[torch.Tensor, LinearAttentionState]:
    """One token of causal linear attention: ``(o_t (..., e), new state)``; ``O(d e)`` work and state."""
    check_state(state, LinearAttentionState, q_t, v_t)
    if state is None:
        state = LinearAttentionState(q_t.new_zeros(*q_t.shape, v_t.shape[-1]), torch.zeros_like(q_t), 0)
    g = 1.0 if decay is None else float(decay)
    S = g * state.S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    z = g * state.z + k_t
    num = (q_t.unsqueeze(-2) @ S).squeeze(-2)
    if normalize:
        num = num / ((q_t * z).sum(-1, keepdim=True) + eps)
    return num, LinearAttentionState(S, z, state.length + 1)


def _linear_chunked(q, k, v, normalize, decay, eps, chunk):
    *lead, n, d = q.shape
    e = v.shape[-1]
    c, nc, pad = _chunk_layout(n, chunk)
    v1 = torch.cat([v, _ones_column(v)], dim=-1)
    if pad:
        q, k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
    Q, K, V = (t.reshape(*lead, nc, c, t.shape[-1]) for t in (q, k, v1))
    w = _end_weights(c, decay, q)
    local = (K * w.unsqueeze(-1)).transpose(-1, -2) @ V  # (..., nc, d, e+1)
    S0 = _exclusive_scan(local, 1.0 if decay is None else float(decay) ** c)
    g1 = torch.ones(c, dtype=q.dtype, device=q.device) if decay is None else decay ** torch.arange(
        1, c + 1, dtype=q.dtype, device=q.device)
    out = ((Q @ K.transpose(-1, -2)) * _decay_mask(c, decay, q)) @ V + g1[:, None] * (Q @ S0)
    out = out.reshape(*lead, nc * c, e + 1)[..., :n, :]
    wt = _end_weights(c - pad, decay, q)
    tail = (K[..., -1, :c - pad, :] * wt.unsqueeze(-1)).transpose(-1, -2) @ V[..., -1, :c - pad, :]
    final = (1.0 if decay is None else float(decay) ** (c - pad)) * S0[..., -1, :, :] + tail
    state = LinearAttentionState(final[..., :e], final[..., e], n)
    num = out[..., :e]
    return (num / (out[..., e:] + eps) if normalize else num), state


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     normalize: bool = True, decay: float | None = None, eps: float = 1e-6, form: Form = "auto",
                     chunk_size: int | None = None, cost_model: CostModel | None = None, return_state: bool = False):
    """Linear attention ``o_t = Σ_{i≤t} γ^{t−i} (q_t·k_i) v_i`` (divided by ``Σ γ^{t−i} q_t·k_i + eps`` when
    ``normalize``): ``q, k (..., n, d)`` (already through a feature map), ``v (..., n, e)`` -> ``(..., n, e)``.
    The same forms and options as :func:`tensor_attention`."""
    _check(q, k, v, decay, 0.0, eps, form, causal, chunk_size)
    if causal and q.shape[-2] == 0:
        return _empty(v, return_state)
    if not causal:
        if return_state:
            raise ValueError("return_state=True needs causal=True (a bidirectional layer has no running state)")
        num = q @ (k.transpose(-1, -2) @ v)
        return num / (q @ k.sum(-2).unsqueeze(-1) + eps) if normalize else num
    if form == "auto" or (form == "chunked" and chunk_size is None):
        plan = plan_attention("linear", q, v, cost_model=cost_model, force=form, chunk_size=chunk_size)
        form, chunk_size = plan.form, plan.chunk
    if form == "parallel" and not return_state:
        M = (q @ k.transpose(-1, -2)) * _decay_mask(q.shape[-2], decay, q)
        num = M @ v
        return num / (M.sum(-1, keepdim=True) + eps) if normalize else num
    if form == "recurrent":
        outs, state = [], None
        for t in range(q.shape[-2]):
            o, state = linear_attention_step(q[..., t, :], k[..., t, :], v[..., t, :], state, normalize=normalize,
                                             decay=decay, eps=eps)
            outs.append(o)
        out = torch.stack(outs, dim=-2)
    else:
        out, state = _linear_chunked(q, k, v, normalize, decay, eps, q.shape[-2] if form == "parallel"
                                     else int(chunk_size))
    return (out, state) if return_state else out


# --------------------------------------------------------------------------------------------------------- softmax
def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      return_state: bool = False):
    """Dot-product attention ``softmax(q kᵀ/√d) v`` (PyTorch's fused kernel): the quadratic baseline."""
    if q.dim() < 2 or q.shape != k.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q, k (..., n, d) and v (..., n, e) must agree; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return (out, SoftmaxAttentionState(k, v)) if return_state else out


def softmax_attention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                           state: SoftmaxAttentionState | None = None) -> tuple[torch.Tensor, SoftmaxAttentionState]:
    """One token with a KV cache: ``O(t d)`` work and a state that grows with ``t``."""
    check_state(state, SoftmaxAttentionState, q_t, v_t)
    k = k_t.unsqueeze(-2) if state is None else torch.cat([state.k, k_t.unsqueeze(-2)], dim=-2)
    v = v_t.unsqueeze(-2) if state is None else torch.cat([state.v, v_t.unsqueeze(-2)], dim=-2)
    out = F.scaled_dot_product_attention(q_t.unsqueeze(-2), k, v).squeeze(-2)
    return out, SoftmaxAttentionState(k, v)


def check_state(state: object, kind: type, q_t: torch.Tensor, v_t: torch.Tensor) -> None:
    """``state`` must be ``None`` or a ``kind`` made for tokens like ``q_t (..., d)``, ``v_t (..., e)``: the same
    leading (batch, head) dimensions, ``d`` and ``e``, dtype and device — a state of another batch would broadcast
    into outputs of the wrong size."""
    if state is None:
        return
    if not isinstance(state, kind):
        raise TypeError(f"state is a {type(state).__name__}: expected None (a new sequence) or the {kind.__name__} "
                        f"that this layer's prefill() or step() returned")
    lead, d, e = tuple(q_t.shape[:-1]), q_t.shape[-1], v_t.shape[-1]
    t = state.k.shape[-2] if kind is SoftmaxAttentionState else None
    trailing = {"S": (d, e) if kind is LinearAttentionState else (d, d), "C": (d, e), "m": (d,), "G": (d, e),
                "h": (d,), "z": (d,), "k": (t, d), "v": (t, e)}
    for f in fields(state):
        value = getattr(state, f.name)
        if not isinstance(value, torch.Tensor):
            continue
        want = lead + trailing[f.name]
        if tuple(value.shape) != want or value.dtype != q_t.dtype or value.device != q_t.device:
            raise ValueError(f"state.{f.name} is {value.dtype} {tuple(value.shape)} on {value.device}: this token "
                             f"needs {q_t.dtype} {want} on {q_t.device} (a state from another batch, layer or "
                             f"dtype; start a new sequence with state=None)")


# ------------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class AttentionProblem:
    """One causal attention contraction: ``rows`` independent sequences (batch × heads) of ``n`` tokens."""

    order: str  # "tensor" (second order) | "linear" (first order)
    n: int
    d: int
    e: int
    rows: int
    masked: bool
    dtype: torch.dtype
    device: str
    training: bool


@dataclass(frozen=True)
class AttentionPlan(MeasuredPlan):
    """Which form computes the attention, with which chunk size, and what the cost model expects."""

    form: str  # "chunked" | "recurrent" | "parallel"
    chunk: int | None
    seconds: float
    flops: float

    def describe(self) -> str:
        what = f"chunked scan, chunks of {self.chunk}" if self.form == "chunked" else (
            "token loop (O(d²) state)" if self.form == "recurrent" else "explicit n×n products")
        return f"{what}: {self.flops / 1e6:.1f} MFLOP, est. {1e3 * self.seconds:.3f} ms{self.measured_tail()}"

    __str__ = describe


_CHUNKS = (16, 32, 64, 128, 256)


def _chunked_cost(p: AttentionProblem, c: int, model: CostModel) -> AttentionPlan:
    c = max(1, min(c, p.n))  # (an empty sequence: chunks of one, none of them run)
    nc = -(-p.n // c)
    d, e = p.d, p.e + 1
    second = p.order == "tensor"
    per_chunk = 2 * c * c * d + 2 * c * c * e + 2 * c * d * e + 2 * c * d * e  # qk, MV, Q S0 (linear), summaries
    if second:
        per_chunk += 2 * c**3 + 2 * c * d * d + 2 * c * c * d + 2 * d * d * e * 2 + 2 * c * c * (d + e) + 2 * c * d * e
    flops = float(p.rows * nc * per_chunk * (3 if p.training else 1))
    itemsize = torch.empty((), dtype=p.dtype).element_size()
    traffic = itemsize * p.rows * nc * (6 * c * c + (4 * d * d + 3 * d * e if second else 2 * d * e))
    ops = 30 if second else 12
    seconds = flops / (model.peak_flops * model.batched * min(1.0, c / model.fat) ** 0.5) + traffic / model.bandwidth
    return AttentionPlan("chunked", c, seconds + ops * model.call_overhead * (3 if p.training else 1), flops)


def _recurrent_cost(p: AttentionProblem, model: CostModel) -> AttentionPlan:
    flops = float(p.rows * p.n * (4 * p.d * p.d + 6 * p.d * p.e) * (3 if p.training else 1))
    ops = (16 if p.order == "tensor" else 6) * p.n * (3 if p.training else 1)
    return AttentionPlan("recurrent", None, flops / (model.peak_flops * 0.05) + ops * model.call_overhead, flops)


@register_strategy(KIND, "auto")
def _auto(p: AttentionProblem, model: CostModel) -> list[AttentionPlan]:
    return _chunks(p, model) + [_recurrent_cost(p, model)]


@register_strategy(KIND, "chunked")
def _chunks(p: AttentionProblem, model: CostModel) -> list[AttentionPlan]:
    sizes = sorted({max(1, min(c, p.n)) for c in _CHUNKS})
    return [_chunked_cost(p, c, model) for c in sizes]


@register_strategy(KIND, "recurrent")
def _recurrent(p: AttentionProblem, model: CostModel) -> list[AttentionPlan]:
    return [_recurrent_cost(p, model)]


@register_strategy(KIND, "parallel")
def _parallel(p: AttentionProblem, model: CostModel) -> list[AttentionPlan]:
    flops = float(p.rows * (2 * p.n**3 + 4 * p.n * p.n * (p.d + p.e)))
    return [AttentionPlan("parallel", None, flops / model.peak_flops + 8 * model.call_overhead, flops)]


def _measure(p: AttentionProblem):
    device = torch.device(p.device)

    def measure(plan: AttentionPlan) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k = (torch.randn(p.rows, p.n, p.d, dtype=p.dtype, device=device, generator=gen) / p.d**0.5
                for _ in range(2))
        v = torch.randn(p.rows, p.n, p.e, dtype=p.dtype, device=device, generator=gen)
        fn = tensor_attention if p.order == "tensor" else linear_attention
        kw = {"masked": p.masked} if p.order == "tensor" else {}
        with torch.no_grad():
            return time_call(lambda: fn(q, k, v, form=plan.form, chunk_size=plan.chunk, **kw), device, reps=3,
                             warmup=1)
    return measure


def plan_attention(order: str, q: torch.Tensor, v: torch.Tensor, *, masked: bool = True,
                   cost_model: CostModel | None = None, force: str = "auto", chunk_size: int | None = None,
                   autotune: bool | None = None) -> AttentionPlan:
    """The (cached) plan for a causal attention of ``order`` ``"tensor"`` or ``"linear"`` on ``q (..., n, d)``,
    ``v (..., n, e)``: chunked at the cheapest chunk size, or the token loop; ``force`` one of
    ``"auto"``, ``"chunked"``, ``"recurrent"``, ``"parallel"``; ``chunk_size`` fixes the chunk."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} is not allowed: expected a positive integer or None")
        return AttentionPlan("chunked", min(chunk_size, size_hint(q.shape[-2])), float("nan"), float("nan"))
    # (symbolic sizes priced by their example, without a guard: see size_hint)
    problem = AttentionProblem(order, size_hint(q.shape[-2]), q.shape[-1], v.shape[-1],
                               size_hint(math.prod(q.shape[:-2])), masked, q.dtype, str(q.device),
                               torch.is_grad_enabled() and q.requires_grad)
    return make_plan(KIND, force, problem, cost_model=cost_model, device=q.device, measure=_measure(problem),
                     autotune=autotune)
