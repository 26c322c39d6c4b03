"""ADTN weight generators (Qing, Zhou, Li, Ran): a tensor of ``2^Q`` numbers made by a deep tensor network.

The weights of a layer, flattened in row-major order, are the first ``numel`` entries of a ``Q``-index tensor with
every index of dimension 2 (``2^Q ≥ numel``; the spec's reconstruction — :func:`adtn_qubits` and
:func:`adtn_reshape` give the alternatives: every axis its own qubits, in blocks or interleaved). It is generated
from the product state ``e_0 = (1, 0)^{⊗Q}`` by ``M`` brick-wall layers of ``2 × 2 × 2 × 2`` gates (``4 × 4``
matrices on neighbouring index pairs: first the pairs ``(0, 1), (2, 3), …``, then ``(1, 2), (3, 4), …`` — ``Q − 1``
gates per layer), with an elementwise activation between layers and a global scale:

    T = λ · L^{(M)} σ(… L^{(2)} σ(L^{(1)} e_0)).

Index 0 is the most significant bit of the flat position. A gate ``G`` on pair ``(q, q+1)`` maps the combined index
``i = 2 s_q + s_{q+1}``: ``new[…, i, …] = Σ_j G[i, j] old[…, j, …]``. The topology is the spec's reconstruction
(``shared/spec/adtn.md``); it is stated in every report.

Layers are never formed as matrices (memory ``O(2^Q)``). The planner (kind ``"adtn"``) chooses how many neighbouring
gates of a half-layer are merged into one Kronecker block (``g`` gates: a ``4^g × 4^g`` matrix applied in one pass
over the vector), trading passes over memory for arithmetic; ``g = 1`` is the gate-by-gate reference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._tracing import traced
from .contraction.autotune import time_call
from .contraction.cost import CostModel
from .contraction.planner import MeasuredPlan, make_plan, register_strategy
from .contraction.tt_linear_plans import scratch_buffer

__all__ = ["adtn_generate", "brick_layer_pairs", "adtn_num_params", "adtn_live_params", "ADTNPlan", "plan_adtn",
           "ACTIVATIONS", "num_qubits", "orthogonal_gates"]

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")
KIND = "adtn"
_MAX_GROUP = 3  # 64 × 64 blocks at most


def num_qubits(numel: int) -> int:
    """The smallest ``Q`` with ``2^Q ≥ numel`` (at least 2, so that a gate fits)."""
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel={numel!r} is not allowed: expected a positive integer")
    return max(2, math.ceil(math.log2(numel)))


MAPPINGS = ("rowmajor", "axes", "interleaved")


def _axis_bits(shape: Sequence[int]) -> list[int]:
    return [math.ceil(math.log2(d)) for d in shape]


def adtn_qubits(shape: Sequence[int], mapping: str = "rowmajor") -> int:
    """``Q`` of the generator of a tensor of ``shape`` (at least 2, so that a gate fits). ``mapping`` (how the 2^Q
    entries become the tensor; the spec's reconstruction is ``"rowmajor"``): ``"rowmajor"`` — the first ``numel``
    entries, ``Q = ⌈log₂ numel⌉``; ``"axes"`` — every axis padded to a power of two and given its own qubits, axis
    after axis, most significant bit first, ``Q = Σ ⌈log₂ dᵢ⌉``; ``"interleaved"`` — the same qubits, taken from the
    axes in turn (most significant bits first), so that every region of the chain holds bits of every axis."""
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r} is not allowed: expected one of {', '.join(MAPPINGS)}")
    if mapping == "rowmajor":
        return num_qubits(math.prod(shape))
    return max(2, sum(_axis_bits(shape)))


def _chain_order(bits: list[int], mapping: str) -> list[tuple[int, int]]:
    """``(axis, bit)`` of each qubit along the chain (bit 0 the least significant)."""
    if mapping == "axes":
        return [(a, b) for a, n in enumerate(bits) for b in reversed(range(n))]
    order, left = [], list(bits)
    while any(left):
        for a in range(len(left)):
            if left[a]:
                left[a] -= 1
                order.append((a, left[a]))
    return order


def adtn_reshape(vector: torch.Tensor, shape: Sequence[int], mapping: str = "rowmajor") -> torch.Tensor:
    """``(2^Q,) -> shape``: the generated vector as the tensor, by ``mapping`` (:func:`adtn_qubits`)."""
    shape = tuple(shape)
    if mapping == "rowmajor":
        return vector[:math.prod(shape)].reshape(shape)
    bits = _axis_bits(shape)
    used = sum(bits)
    t = vector[:2 ** used]  # (Q exceeds the axes' bits only when they hold fewer than 2)
    if mapping == "interleaved" and used:
        chain = _chain_order(bits, mapping)
        axis_major = _chain_order(bits, "axes")
        t = t.reshape([2] * used).permute([chain.index(q) for q in axis_major])
    t = t.reshape([2 ** n for n in bits])
    return t[tuple(slice(0, d) for d in shape)]


def brick_layer_pairs(Q: int) -> list[list[int]]:
    """The first qubit of each gate, per half-layer: ``[[0, 2, 4, …], [1, 3, 5, …]]`` (``Q − 1`` gates in all)."""
    return [list(range(0, Q - 1, 2)), list(range(1, Q - 1, 2))]


def orthogonal_gates(latent: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 4) -> (..., 4, 4)``: the orthogonal polar factor ``U Vᵀ`` of each latent matrix ``U S Vᵀ`` — the
    orthogonal matrix nearest to it in Frobenius norm, the spec's latent-to-unitary map (real gates: orthogonal).
    Differentiable wherever the latent's singular values are distinct (almost surely for trained latents)."""
    u, _, vh = torch.linalg.svd(latent)
    return u @ vh


def adtn_num_params(Q: int, depth: int, *, scale: bool = True) -> int:
    """Parameters of one generator: ``16 · depth · (Q − 1)`` gate entries, plus 1 for the learnable scale."""
    return 16 * depth * (Q - 1) + int(scale)


def adtn_live_params(Q: int, depth: int, *, scale: bool = True) -> int:
    """Parameters of one generator with unconstrained gates that can change the generated tensor (structurally: a
    ReLU may also switch entries off for given gates). The first layer acts on the fixed ``e_0``: a gate of its first
    half-layer sees ``(1, 0) ⊗ (1, 0)``, so only its first column (4 entries) matters; for odd ``Q`` the last gate of
    its second half sees ``(·) ⊗ (1, 0)`` (8 entries). Every entry of the later layers matters; the scale counts 1.
    (With ``unitary=True`` every latent entry moves the polar factor: :func:`adtn_num_params` counts them.)"""
    first, second = brick_layer_pairs(Q)
    live = 4 * len(first) + 16 * len(second) - (8 if Q % 2 and second else 0)
    return live + 16 * (Q - 1) * (depth - 1) + int(scale)


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, 0.01)
    if activation == "tanh":
        return torch.tanh(x)
    return x


def _kron(gates: list[torch.Tensor]) -> torch.Tensor:
    out = gates[0]
    for g in gates[1:]:
        out = torch.kron(out, g)
    return out


def _passes(Q: int, group: int) -> list[tuple[int, int, list[int]]]:
    """The passes of one brick layer, in order: ``(first qubit, qubits spanned, indices of its gates)``."""
    out, offset = [], 0
    for starts in brick_layer_pairs(Q):
        for i in range(0, len(starts), group):
            chunk = starts[i:i + group]
            out.append((chunk[0], 2 * len(chunk), [offset + i + j for j in range(len(chunk))]))
        offset += len(starts)
    return out


def _blocks(layer_gates: torch.Tensor, passes) -> list[torch.Tensor]:
    return [layer_gates[idx[0]] if len(idx) == 1 else _kron([layer_gates[i] for i in idx]) for _, _, idx in passes]


def _apply_pass(x: torch.Tensor, block: torch.Tensor, first: int, span: int, Q: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One pass: the ``2^span × 2^span`` block on qubits ``first … first + span − 1`` of the flat vector ``x``."""
    rest = 2 ** (Q - first - span)
    if rest == 1:  # the last qubits: one plain GEMM (a broadcast matmul with 1 column is ~6× slower)
        return torch.mm(x.view(-1, 2**span), block.T, out=None if out is None else out.view(-1, 2**span)).view(-1)
    view = x.view(2 ** first, 2**span, rest)  # bmm on a stride-0 view: no copies of block or state
    res = torch.bmm(block.expand(view.shape[0], -1, -1), view, out=None if out is None else out.view(view.shape))
    return res.view(-1)


def _first_half(Q: int, group: int) -> int:
    """How many of a brick layer's passes (:func:`_passes`) make its first half-layer."""
    return -(-len(brick_layer_pairs(Q)[0]) // group)


def _start_factors(blocks: list[torch.Tensor], Q: int, group: int) -> list[torch.Tensor]:
    """The first layer's first half acts on ``e_0 = (1, 0)^{⊗Q}``, a product state, with blocks on disjoint qubits:
    its output is the Kronecker product of each block's first column (and ``(1, 0)`` for the last qubit when ``Q`` is
    odd). These are the factors, in qubit order."""
    factors = [blocks[p][:, 0] for p in range(_first_half(Q, group))]
    if Q % 2:
        factors.append(torch.tensor([1.0, 0.0], dtype=blocks[0].dtype, device=blocks[0].device))
    return factors


def _start(blocks: list[torch.Tensor], Q: int, group: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The first layer's state after its first half-layer (one Kronecker product), the factors, and how many
    passes that skips."""
    factors = _start_factors(blocks, Q, group)
    return _kron(factors), factors, _first_half(Q, group)


def _factor_grads(grad: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of the factors of ``kron(*factors)`` given its gradient: each factor's is ``grad`` contracted with
    every other factor (about one read of ``grad`` per factor, no products of blocks)."""
    dims = [f.numel() for f in factors]
    out = []
    for k in range(len(factors)):
        t = grad.view(dims)
        for j in range(len(dims) - 1, k, -1):  # the factors after k, from the right
            t = t @ factors[j]
        t = t.reshape(-1)
        for j in range(k):  # the factors before k, from the left
            t = factors[j] @ t.view(dims[j], -1)
        out.append(t)
    return out


def _brick_layer(x: torch.Tensor | None, layer_gates: torch.Tensor, Q: int, group: int) -> torch.Tensor:
    """One brick layer through autograd (every pass's output a fresh tensor); ``x=None``: the first layer, on
    ``e_0`` (its first half is a Kronecker product, :func:`_start_factors`)."""
    passes = _passes(Q, group)
    blocks = _blocks(layer_gates, passes)
    skip = 0
    if x is None:
        x, _, skip = _start(blocks, Q, group)
    for (first, span, _), block in list(zip(passes, blocks))[skip:]:
        x = _apply_pass(x.contiguous(), block, first, span, Q)
    return x


def _activation_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``σ'(x)`` for the activations of :data:`ACTIVATIONS` (``x``: the pre-activation)."""
    if activation == "relu":
        return (x > 0).to(x.dtype)
    if activation == "leaky_relu":
        return (x > 0).to(x.dtype).mul_(0.99).add_(0.01)  # in x's dtype (a where() on two floats gives float32)
    if activation == "tanh":
        return 1 - torch.tanh(x) ** 2
    return torch.ones_like(x)


_RECOMPUTE_SLOT = 6  # first scratch slot of the backward's recomputed pass inputs (one slot per pass)


class _Generate(torch.autograd.Function):
    """All brick layers at once, keeping only each layer's output for the backward pass.

    Forward: with ``scratch`` (training), the passes of a layer write into two reused per-thread scratch buffers (a
    fresh ``2^Q`` tensor has its pages faulted in on every pass: ~15 ms at ``2^24``); only each layer's output is a
    new tensor. Backward, layer by layer from the last: recompute the layer's pass inputs from its saved input (into
    reused scratch buffers too, one per pass: the memory a backward needs anyway, kept for the next step), then
    run the passes backwards — the state's gradient through scratch buffers, each block's gradient as one reduction,
    the gates' gradients through the (tiny) Kronecker products by autograd, the activation's by its derivative.
    """

    @staticmethod
    def forward(ctx, gates: torch.Tensor, activation: str, group: int, scratch: bool) -> torch.Tensor:
        depth, Q = gates.shape[0], gates.shape[1] + 1
        size = 2 ** Q
        passes = _passes(Q, group)
        outputs = []
        x = None
        for m in range(depth):
            blocks = _blocks(gates[m], passes)
            if m:
                u, skip = _activate(x, activation), 0
            else:  # on e_0: the first half-layer is a Kronecker product
                u, _, skip = _start(blocks, Q, group)
            for p in range(skip, len(passes)):
                (first, span, _), block = passes[p], blocks[p]
                last = p == len(passes) - 1
                u = _apply_pass(u, block, first, span, Q, out=None if last or not scratch
                                else scratch_buffer(p % 2, size, gates.dtype, gates.device))
            x = u
            outputs.append(x)
        ctx.save_for_backward(gates, *outputs[:-1])
        ctx.meta = (activation, group)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gates, *inputs = ctx.saved_tensors
        activation, group = ctx.meta
        depth, Q = gates.shape[0], gates.shape[1] + 1
        size = 2 ** Q
        passes = _passes(Q, group)
        grad_gates = torch.zeros_like(gates)
        g = grad.contiguous()
        turn = 0  # the state's gradient alternates between two scratch buffers, across layers too
        for m in range(depth - 1, -1, -1):
            with torch.enable_grad():
                layer_gates = gates[m].detach().requires_grad_()
                blocks = _blocks(layer_gates, passes)
            # the pass inputs of layer m, recomputed from its saved input (the first layer: from the Kronecker
            # product its first half-layer makes of e_0)
            if m:
                u, skip = _activate(inputs[m - 1], activation), 0
            else:
                with torch.no_grad():
                    u, factors, skip = _start(blocks, Q, group)
            pass_inputs = [None] * skip + [u]
            for p in range(skip, len(passes) - 1):
                (first, span, _), block = passes[p], blocks[p]
                # into reused buffers: a fresh 2^Q tensor has its pages faulted in (~15 ms at 2^24) on every pass
                u = _apply_pass(u, block.detach(), first, span, Q,
                                out=scratch_buffer(_RECOMPUTE_SLOT + p, size, gates.dtype, gates.device))
                pass_inputs.append(u)
            grad_blocks = []
            for p in range(len(passes) - 1, skip - 1, -1):
                (first, span, _), block, u = passes[p], blocks[p].detach(), pass_inputs[p]
                a, rest = 2**span, 2 ** (Q - first - span)
                if rest == 1:
                    gv, uv = g.view(-1, a), u.view(-1, a)
                    grad_blocks.append(gv.T @ uv)
                    slot = scratch_buffer(2 + turn % 2, size, g.dtype, g.device)
                    g = torch.mm(gv, block, out=slot.view(-1, a)).view(-1)
                else:
                    batch = 2**first
                    gv, uv = g.view(batch, a, rest), u.view(batch, a, rest)
                    if batch == 1:
                        grad_blocks.append(gv[0] @ uv[0].T)
                    elif batch * a * a <= size:  # per-slice products, summed: no bigger than the state
                        part = scratch_buffer(4, batch * a * a, g.dtype, g.device).view(batch, a, a)
                        grad_blocks.append(torch.bmm(gv, uv.transpose(1, 2), out=part).sum(0))
                    else:  # few columns per slice: bring the block index first, then one GEMM
                        gp = scratch_buffer(4, size, g.dtype, g.device).view(a, batch, rest)
                        up = scratch_buffer(5, size, g.dtype, g.device).view(a, batch, rest)
                        gp.copy_(gv.transpose(0, 1))
                        up.copy_(uv.transpose(0, 1))
                        grad_blocks.append(gp.view(a, -1) @ up.view(a, -1).T)
                    slot = scratch_buffer(2 + turn % 2, size, g.dtype, g.device)
                    g = torch.bmm(block.T.expand(batch, -1, -1), gv, out=slot.view(batch, a, rest)).view(-1)
                pass_inputs[p] = None  # free as we go
                turn += 1
            if skip:  # the first half-layer on e_0: each block's first column gets its factor's gradient
                for k, dv in reversed(list(enumerate(_factor_grads(g, factors)[:skip]))):
                    gb = torch.zeros_like(blocks[k])
                    gb[:, 0] = dv
                    grad_blocks.append(gb)
            grad_blocks.reverse()
            grad_gates[m] = torch.autograd.grad(blocks, layer_gates, grad_blocks)[0]
            if m:  # through the activation, to the previous layer's output (g is a scratch buffer: in place)
                if activation == "relu":
                    g = g.masked_fill_(inputs[m - 1] <= 0, 0.0)
                elif activation != "none":
                    g = g.mul_(_activation_grad(inputs[m - 1], activation))
        return grad_gates, None, None, None


def adtn_generate(gates: torch.Tensor, *, numel: int | None = None, activation: str = "relu",
                  scale: torch.Tensor | float = 1.0, group: int | None = None, recompute: bool | None = None,
                  cost_model: CostModel | None = None) -> torch.Tensor:
    """The generated tensor: ``gates (depth, Q − 1, 4, 4)`` -> ``(numel,)`` (default: all ``2^Q`` entries).

    ``group``: gates merged per pass (``None``: the planner's choice; ``1``: gate by gate). ``recompute``: keep only
    each brick layer's output for the backward pass and recompute the passes inside it (default: when the vector is
    large), instead of storing one ``2^Q`` intermediate per pass; in training that path writes the passes into reused
    per-thread scratch buffers (one ``2^Q`` vector per pass of a brick layer plus a few — 2^24 weights at 3 gates per
    pass: about 13 vectors, 0.8 GB in fp32 — kept for the next step; ``torchtn.core.release_scratch()`` frees them).
    The first layer's first half-layer, acting on the product state ``e_0``, is one Kronecker product of its blocks'
    first columns.
    """
    if gates.dim() != 4 or gates.shape[-2:] != (4, 4) or gates.shape[1] < 1:
        raise ValueError(f"gates has shape {tuple(gates.shape)}: expected (depth, Q - 1, 4, 4)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not allowed: expected one of {', '.join(ACTIVATIONS)}")
    Q = gates.shape[1] + 1
    size = 2 ** Q
    if numel is not None and not (isinstance(numel, int) and 1 <= numel <= size):
        raise ValueError(f"numel={numel!r} is not allowed: expected 1 … 2^Q = {size}")
    if group is None:
        group = plan_adtn(Q, gates.shape[0], gates.dtype, gates.device, cost_model=cost_model).group
    if not (isinstance(group, int) and 1 <= group <= _MAX_GROUP):
        raise ValueError(f"group={group!r} is not allowed: expected 1 … {_MAX_GROUP}")
    needs_grad = torch.is_grad_enabled() and gates.requires_grad
    if recompute is None:
        recompute = needs_grad and size >= 2**16
    if traced() or (needs_grad and not recompute):
        x = None
        for m in range(gates.shape[0]):
            x = _brick_layer(_activate(x, activation) if m else None, gates[m], Q, group)
    else:
        # scratch buffers pay off when generating at every step (training); a generation without gradients (eval,
        # cached by the layers) allocates instead of keeping two 2^Q buffers alive
        x = _Generate.apply(gates, activation, group, needs_grad)
    out = x if numel is None else x[:numel]
    return out * scale


# --------------------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ADTNProblem:
    Q: int
    depth: int
    dtype: torch.dtype
    device: str


@dataclass(frozen=True)
class ADTNPlan(MeasuredPlan):
    """How many gates of a half-layer are merged into one Kronecker block per pass over the ``2^Q`` vector."""

    group: int
    seconds: float
    flops: float

    def describe(self) -> str:
        return (f"{self.group} gate(s) per pass ({4 ** self.group}×{4 ** self.group} blocks): "
                f"{self.flops / 1e6:.1f} MFLOP, est. {1e3 * self.seconds:.2f} ms{self.measured_tail()}")

    __str__ = describe


def _price(p: ADTNProblem, group: int, model: CostModel) -> ADTNPlan:
    """Every pass is one (batched) product of a ``4^g × 4^g`` block with the vector viewed as ``(2^first, 4^g,
    rest)``, priced by the device's cost model like any other product — except the first layer's first half-layer,
    one Kronecker product of vectors."""
    seconds, flops, skip_s, skip_f = 0.0, 0.0, 0.0, 0.0
    half = _first_half(p.Q, group)
    for i, (first, span, _) in enumerate(_passes(p.Q, group)):
        block, rest = 2**span, 2 ** (p.Q - first - span)
        s, f = model.matmul_seconds(2**first, block, block, rest, p.dtype.itemsize), 2.0 * 2**p.Q * block
        seconds, flops = seconds + s, flops + f
        if i < half:
            skip_s, skip_f = skip_s + s, skip_f + f
    # the first layer's first half-layer is one Kronecker product of vectors (the start is a product state)
    start = model.copy_seconds(2**p.Q, p.dtype.itemsize)
    return ADTNPlan(group, p.depth * seconds - skip_s + start, p.depth * flops - skip_f)


@register_strategy(KIND, "auto")
def _auto(p: ADTNProblem, model: CostModel) -> list[ADTNPlan]:
    return [_price(p, g, model) for g in range(1, _MAX_GROUP + 1)]


@register_strategy(KIND, "gatewise")
def _gatewise(p: ADTNProblem, model: CostModel) -> list[ADTNPlan]:
    return [_price(p, 1, model)]


def _measure(p: ADTNProblem):
    device = torch.device(p.device)

    def measure(plan: ADTNPlan) -> float:
        gates = torch.randn(p.depth, p.Q - 1, 4, 4, dtype=p.dtype, device=device) / 2
        with torch.no_grad():
            return time_call(lambda: adtn_generate(gates, group=plan.group), device, reps=3, warmup=1)
    return measure


def plan_adtn(Q: int, depth: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
              cost_model: CostModel | None = None, strategy: str = "auto",
              autotune: bool | None = None) -> ADTNPlan:
    """The (cached) plan for generating ``2^Q`` entries through ``depth`` brick layers."""
    problem = ADTNProblem(Q, depth, dtype, str(torch.device(device)))
    return make_plan(KIND, strategy, problem, cost_model=cost_model, device=device, measure=_measure(problem),
                     autotune=autotune)
