"""ADTN weight generators (Qing, Zhou, Li, Ran): a tensor of ``2^Q`` numbers made by a deep tensor network.

The weights of a layer, flattened in row-major order, are the first ``numel`` entries of a ``Q``-index tensor with
every index of dimension 2 (``2^Q ≥ numel``). It is generated from the product state ``e_0 = (1, 0)^{⊗Q}`` by ``M``
brick-wall layers of ``2 × 2 × 2 × 2`` gates (``4 × 4`` matrices on neighbouring index pairs: first the pairs
``(0, 1), (2, 3), …``, then ``(1, 2), (3, 4), …`` — ``Q − 1`` gates per layer), with an elementwise activation
between layers and a global scale:

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .contraction.autotune import time_call
from .contraction.cost import CostModel
from .contraction.planner import MeasuredPlan, make_plan, register_strategy

__all__ = ["adtn_generate", "brick_layer_pairs", "adtn_num_params", "ADTNPlan", "plan_adtn", "ACTIVATIONS",
           "num_qubits"]

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")
KIND = "adtn"
_MAX_GROUP = 3  # 64 × 64 blocks at most


def num_qubits(numel: int) -> int:
    """The smallest ``Q`` with ``2^Q ≥ numel`` (at least 2, so that a gate fits)."""
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel={numel!r} is not allowed: expected a positive integer")
    return max(2, math.ceil(math.log2(numel)))


def brick_layer_pairs(Q: int) -> list[list[int]]:
    """The first qubit of each gate, per half-layer: ``[[0, 2, 4, …], [1, 3, 5, …]]`` (``Q − 1`` gates in all)."""
    return [list(range(0, Q - 1, 2)), list(range(1, Q - 1, 2))]


def adtn_num_params(Q: int, depth: int, *, scale: bool = True) -> int:
    """Parameters of one generator: ``16 · depth · (Q − 1)`` gate entries, plus 1 for the learnable scale."""
    return 16 * depth * (Q - 1) + int(scale)


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


def _half_layer(x: torch.Tensor, gates: torch.Tensor, starts: list[int], Q: int, group: int) -> torch.Tensor:
    """Apply the gates of one half-layer (on disjoint pairs starting at ``starts``), ``group`` at a time."""
    for i in range(0, len(starts), group):
        chunk = starts[i:i + group]
        first, span = chunk[0], 2 * len(chunk)  # consecutive pairs: qubits first … first + span − 1
        block = gates[i] if len(chunk) == 1 else _kron([gates[i + j] for j in range(len(chunk))])
        rest = 2 ** (Q - first - span)
        if rest == 1:  # the last qubits: one plain GEMM (a broadcast matmul with 1 column is ~6× slower)
            x = x.reshape(-1, 2**span) @ block.T
        else:
            view = x.reshape(2 ** first, 2**span, rest)  # bmm on a stride-0 view: no copies of block or state
            x = torch.bmm(block.expand(view.shape[0], -1, -1), view)
    return x.reshape(-1)


def _brick_layer(x: torch.Tensor, layer_gates: torch.Tensor, Q: int, group: int) -> torch.Tensor:
    even, odd = brick_layer_pairs(Q)
    x = _half_layer(x, layer_gates[:len(even)], even, Q, group)
    return _half_layer(x, layer_gates[len(even):], odd, Q, group)


def adtn_generate(gates: torch.Tensor, *, numel: int | None = None, activation: str = "relu",
                  scale: torch.Tensor | float = 1.0, group: int | None = None, recompute: bool | None = None,
                  cost_model: CostModel | None = None) -> torch.Tensor:
    """The generated tensor: ``gates (depth, Q − 1, 4, 4)`` -> ``(numel,)`` (default: all ``2^Q`` entries).

    ``group``: gates merged per pass (``None``: the planner's choice; ``1``: gate by gate). ``recompute``: keep only
    each brick layer's input for the backward pass and recompute inside it (default: when the vector is large),
    instead of storing one ``2^Q`` intermediate per pass.
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
    if recompute is None:
        recompute = torch.is_grad_enabled() and gates.requires_grad and size >= 2**16
    x = torch.zeros(size, dtype=gates.dtype, device=gates.device)
    x[0] = 1
    for m in range(gates.shape[0]):
        if m:
            x = _activate(x, activation)
        if recompute and not torch.compiler.is_compiling():
            x = checkpoint(_brick_layer, x, gates[m], Q, group, use_reentrant=False)
        else:
            x = _brick_layer(x, gates[m], Q, group)
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
    rest)``, priced by the device's cost model like any other product."""
    itemsize = p.dtype.itemsize
    seconds, flops = 0.0, 0.0
    for starts in brick_layer_pairs(p.Q):
        for i in range(0, len(starts), group):
            first, span = starts[i], 2 * len(starts[i:i + group])
            block, rest = 2 ** span, 2 ** (p.Q - first - span)
            seconds += model.matmul_seconds(2 ** first, block, block, rest, itemsize)
            flops += 2.0 * 2 ** p.Q * block
    return ADTNPlan(group, p.depth * seconds, p.depth * flops)


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
