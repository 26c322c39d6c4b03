"""Planning and executing ``y = x Wᵀ`` for a TT-matrix ``W`` without forming ``W`` (unless that is cheapest).

*Plan once, run many* (after opt_einsum). The strategies registered here for kind ``"tt_linear"`` enumerate ways of
merging neighbouring cores into groups and the sweep direction; ``"auto"`` tries every grouping in both directions,
``"dense"`` merges everything (rebuild ``W``, one GEMM), ``"rtl"``/``"ltr"`` go core by core. The shared planner
(:mod:`.planner`) prices candidates with the device's cost model, optionally measures them, and caches the winner.
:func:`tt_linear` executes a plan. Every step is one (batched) matmul on a contiguous view, so no intermediate is ever
permuted:

* right-to-left (``"rtl"``): the state is ``[batch, n_<g, r, m_≥g]``; group ``g`` contracts ``(n_g, r_g)``;
* left-to-right (``"ltr"``): the state is ``[batch, m_<g, r, n_≥g]``; group ``g`` contracts ``(r_{g-1}, n_g)``.

In training, autograd differentiates the same steps: with every batched step a ``bmm`` on a stride-0 view (never
``torch.matmul``'s folded form, whose transposed copies cost as much as the products in the backward pass), a
hand-written backward for the whole sweep was measured and was not faster on this machine; the planner prices the backward products so that merging,
dearer in training, is chosen only where it still wins. Merged groups can be cached by the caller
(:class:`MergedCache`, for inference).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._checks import check_input
from .._tracing import jit_tracing, kept, size_hint, traced
from ..tt import merge_cores, tt_num_params, tt_ranks, tt_shapes
from .autotune import time_call
from .cost import DEFAULT_COST_MODEL, CostModel
from .planner import make_plan, plan_epoch, register_strategy

__all__ = ["ContractionPlan", "TTLinearProblem", "plan_tt_linear", "plan_for", "merge_group", "prepare_groups",
           "tt_linear", "tt_linear_apply", "tt_linear_flops", "MergedCache", "release_scratch"]

Span = tuple[int, int]
KIND = "tt_linear"


@dataclass(frozen=True)
class TTLinearProblem:
    """Everything a plan for ``(batch, ∏n) -> (batch, ∏m)`` depends on (the plan cache key)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    batch: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    training: bool = False  # gradients flow to the cores: price forward + backward
    input_grad: bool = True  # (training) the input needs a gradient too; the first layer's input does not
    cache_merged: bool = False  # merged groups are reused across calls (their cost is not counted)
    cache_limit: int = 1 << 22  # ... but only when they hold at most this many elements in total

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class ContractionPlan:
    """How to compute ``x Wᵀ``: which cores to merge (``groups``, half-open spans) and in which direction to sweep."""

    groups: tuple[Span, ...]
    direction: str  # "rtl" | "ltr"
    batch: int
    flops: int  # multiply-adds ×2 of the contraction steps (plus merges unless cached; ×3 when training)
    seconds: float  # cost-model estimate (forward + backward when training)
    cache_merged: bool  # merged groups may be cached between calls (inference)
    intermediate_numel: int  # largest intermediate of the sweep
    in_sizes: tuple[int, ...]  # product of the input modes of each group
    out_sizes: tuple[int, ...]  # product of the output modes of each group
    ranks: tuple[int, ...] = ()  # bond dimensions the plan was made for
    training: bool = False
    measured_seconds: float | None = None  # set when autotuned: this plan's time on the device
    model_pick_seconds: float | None = None  # ... and the cost model's own pick's time in the same measurement
    measurements: tuple[tuple[str, float], ...] = ()  # every timed candidate
    saved_numel: int = 0  # (training) elements autograd keeps for the backward pass: step inputs, merged groups

    steps: tuple[tuple[int, int], ...] = dataclasses.field(init=False, repr=False, compare=False)
    """``(group, cols)`` in execution order: each step is ``mat_g @ state.reshape(-1, k_g, cols)``."""

    def __post_init__(self) -> None:
        g = len(self.groups)
        if self.direction == "rtl":
            order = range(g - 1, -1, -1)
            cols = [math.prod(self.out_sizes[gi + 1:]) for gi in order]
        else:
            order = range(g)
            cols = [math.prod(self.in_sizes[gi + 1:]) for gi in order]
        object.__setattr__(self, "steps", tuple(zip(order, cols)))

    @property
    def is_dense(self) -> bool:
        return len(self.groups) == 1

    def mat_shapes(self) -> tuple[tuple[int, int], ...]:
        """Shape of each group's step matrix (what :func:`prepare_groups` returns)."""
        r = [self.ranks[a] for a, _ in self.groups] + [1]
        if self.direction == "rtl":
            return tuple((r[i] * m, n * r[i + 1]) for i, (m, n) in enumerate(zip(self.out_sizes, self.in_sizes)))
        return tuple((m * r[i + 1], r[i] * n) for i, (m, n) in enumerate(zip(self.out_sizes, self.in_sizes)))

    def with_measurements(self, seconds: float, measurements: tuple, model_pick_seconds: float) -> "ContractionPlan":
        return dataclasses.replace(self, measured_seconds=seconds, measurements=measurements,
                                   model_pick_seconds=model_pick_seconds)

    def describe(self) -> str:
        groups = " | ".join(f"{a + 1}" if b - a == 1 else f"{a + 1}–{b}" for a, b in self.groups)
        how = "dense weight (all cores merged)" if self.is_dense else f"{self.direction} sweep over groups [{groups}]"
        cached = self.cache_merged and any([_builds_new_tensor(g, self.direction) for g in self.groups])
        cache = ", merged cores cached" if cached else ""
        measured = "" if self.measured_seconds is None else f", measured {self.measured_seconds * 1e3:.3f} ms"
        return (
            f"{how}{cache}: batch {self.batch}, ranks {self.ranks}, {self.flops / 1e6:.2f} MFLOP, "
            f"largest intermediate {self.intermediate_numel:,} elements, est. {self.seconds * 1e3:.3f} ms{measured}"
        )

    __str__ = describe


def _builds_new_tensor(span: Span, direction: str) -> bool:
    """Whether a group's step matrix is a new tensor (merged cores, or a permuted core for ``ltr``) — cacheable."""
    return span[1] - span[0] > 1 or direction == "ltr"


def _spans(d: int) -> list[tuple[Span, ...]]:
    """All ways to cut ``0..d`` into consecutive non-empty spans (``2^(d-1)`` of them)."""
    out = []
    for cuts in itertools.product((False, True), repeat=d - 1):
        spans, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                spans.append((start, i))
                start = i
        spans.append((start, d))
        out.append(tuple(spans))
    return out


def _merge_cost(p: TTLinearProblem, span: Span, model: CostModel) -> tuple[float, int]:
    """Seconds and flops of merging ``span`` (:func:`merge_cores`): one GEMM and one permuting copy per absorbed core."""
    a, b = span
    seconds, flops = model.call_overhead, 0
    rows = p.ranks[a] * p.out_shape[a] * p.in_shape[a]
    for k in range(a + 1, b):
        cols = p.out_shape[k] * p.in_shape[k] * p.ranks[k + 1]
        seconds += model.matmul_seconds(rows, cols, p.ranks[k], 1, p.itemsize)
        flops += 2 * rows * p.ranks[k] * cols
        rows *= p.out_shape[k] * p.in_shape[k]
        seconds += model.copy_seconds(rows * p.ranks[k + 1], p.itemsize)
    return seconds, flops


def _price(groups: tuple[Span, ...], direction: str, p: TTLinearProblem, cache_merged: bool,
           model: CostModel) -> tuple[float, int, int, int]:
    """Estimated seconds, flops, largest intermediate and (in training) elements saved for the backward pass of one
    candidate plan.

    In training a step costs its forward product plus the two products of its backward (state and matrix gradients)
    — except the first step when the input needs no gradient, which saves one product (so it pays to put the
    expensive batched step first) — and a merge costs three times its forward (two products per absorbed core).
    """
    passes = 3 if p.training else 1
    m = [math.prod(p.out_shape[a:b]) for a, b in groups]
    n = [math.prod(p.in_shape[a:b]) for a, b in groups]
    r = [p.ranks[a] for a, _ in groups] + [1]
    seconds, flops, biggest, saved = 0.0, 0, 0, 0
    for gi, span in enumerate(groups):
        if _builds_new_tensor(span, direction) and not cache_merged:
            saved += 2 * r[gi] * m[gi] * n[gi] * r[gi + 1]  # the merged group and, at most as big, its partial merges
            ms, mf = _merge_cost(p, span, model)
            seconds += passes * ms + (2 if p.training else 1) * model.alloc_seconds(
                r[gi] * m[gi] * n[gi] * r[gi + 1], p.itemsize)  # the merged tensor (and its gradient)
            flops += passes * mf
    order = range(len(groups) - 1, -1, -1) if direction == "rtl" else range(len(groups))
    done, rest = 1, math.prod(n)  # finished output modes, untouched input modes
    for step, gi in enumerate(order):
        rest //= n[gi]
        if direction == "rtl":
            a, k, cols, prefix = r[gi] * m[gi], n[gi] * r[gi + 1], done, p.batch * rest
        else:
            a, k, cols, prefix = m[gi] * r[gi + 1], r[gi] * n[gi], rest, p.batch * done
        first = step == 0
        products = passes - (1 if p.training and first and not p.input_grad else 0)
        seconds += products * model.matmul_seconds(prefix, a, k, cols, p.itemsize)
        saved += prefix * k * cols  # each product keeps its input state (the first: the layer's input)
        if not p.training:  # (in training, measured: charging it picks fewer, merged steps that run slower)
            seconds += model.step_overhead
        flops += products * 2 * prefix * a * k * cols
        # fresh tensors: in training every step's output and its input's gradient; in inference only the result
        # (intermediates go to reused scratch buffers)
        if p.training:
            seconds += model.alloc_seconds(prefix * a * cols, p.itemsize)
            if not first or p.input_grad:
                seconds += model.alloc_seconds(prefix * k * cols, p.itemsize)
        elif step == len(groups) - 1:
            seconds += model.alloc_seconds(prefix * a * cols, p.itemsize)
        biggest = max(biggest, prefix * a * cols)
        done *= m[gi]
    return seconds, flops, biggest, saved if p.training else 0


def _candidates(p: TTLinearProblem, model: CostModel, options: Sequence[tuple[tuple[Span, ...], str]]):
    plans = []
    for groups, direction in options:
        merged = sum([p.ranks[a] * math.prod(p.out_shape[a:b]) * math.prod(p.in_shape[a:b]) * p.ranks[b]
                      for a, b in groups if _builds_new_tensor((a, b), direction)])
        can_cache = p.cache_merged and merged <= p.cache_limit
        seconds, flops, biggest, saved = _price(groups, direction, p, can_cache, model)
        plans.append(ContractionPlan(groups, direction, p.batch, flops, seconds, can_cache, biggest,
                                     tuple([math.prod(p.in_shape[a:b]) for a, b in groups]),
                                     tuple([math.prod(p.out_shape[a:b]) for a, b in groups]), p.ranks, p.training,
                                     saved_numel=saved))
    return plans


def fits_dense_memory(p: TTLinearProblem, plan: ContractionPlan) -> bool:
    """Whether a training step on ``plan`` holds at most what the dense layer's does: its parameters, their gradients
    and two Adam moments (4 × the parameters) plus what autograd saves (the dense layer: its input)."""
    params = tt_num_params(p.in_shape, p.out_shape, p.ranks)
    dense = 4 * math.prod(p.out_shape) * math.prod(p.in_shape) + p.batch * math.prod(p.in_shape)
    return 4 * params + plan.saved_numel <= dense


def _within_dense_memory(p: TTLinearProblem, plans: list[ContractionPlan]) -> list[ContractionPlan]:
    """In training, only the plans whose step fits in the dense layer's memory (all of them if none does): on a
    device where every plan costs about one launch per step, time alone would pick core-by-core sweeps that keep
    every intermediate (measured on an H100: 6.3× the dense layer's memory for 784×256 r16 B256)."""
    if not p.training:
        return plans
    return [c for c in plans if fits_dense_memory(p, c)] or plans


@register_strategy(KIND, "auto")
def _auto(p: TTLinearProblem, model: CostModel):
    """Every grouping of neighbouring cores, both sweep directions (the dense plan once); in training only those that
    fit in the dense layer's memory (:func:`fits_dense_memory`) when any does."""
    d = len(p.in_shape)
    return _within_dense_memory(p, _candidates(p, model, [(g, direction) for g in _spans(d) for direction in
                                                          ("rtl", "ltr") if not (len(g) == 1 and direction == "ltr")]))


@register_strategy(KIND, "dense")
def _dense(p: TTLinearProblem, model: CostModel):
    """Rebuild ``W`` from all cores, then one GEMM."""
    return _candidates(p, model, [(((0, len(p.in_shape)),), "rtl")])


def _core_by_core(direction: str):
    def strategy(p: TTLinearProblem, model: CostModel):
        return _candidates(p, model, [(tuple((k, k + 1) for k in range(len(p.in_shape))), direction)])
    strategy.__doc__ = f"Core by core, {'right to left' if direction == 'rtl' else 'left to right'}, nothing merged."
    return strategy


register_strategy(KIND, "rtl")(_core_by_core("rtl"))
register_strategy(KIND, "ltr")(_core_by_core("ltr"))


def random_operands(p: TTLinearProblem) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Seeded random cores and input of the problem's shapes, dtype, device and grad mode (for timing plans)."""
    device = torch.device(p.device)
    gen = torch.Generator(device=device).manual_seed(0)
    cores = [torch.randn(p.ranks[k], m, n, p.ranks[k + 1], dtype=p.dtype, device=device, generator=gen,
                         requires_grad=p.training) for k, (m, n) in enumerate(zip(p.out_shape, p.in_shape))]
    x = torch.randn(p.batch, math.prod(p.in_shape), dtype=p.dtype, device=device, generator=gen,
                    requires_grad=p.training and p.input_grad)
    return cores, x


def plan_call(p: TTLinearProblem, plan: ContractionPlan, cores: Sequence[torch.Tensor],
              x: torch.Tensor) -> Callable[[], None]:
    """One call of ``plan`` as the layer makes it: forward + backward in training; in inference a forward on the
    cached merged groups (when the plan caches them) with scratch buffers."""
    if p.training:
        def run() -> None:
            for c in cores:
                c.grad = None
            tt_linear(x, prepare_groups(cores, plan), plan).sum().backward()
        return run
    with torch.no_grad():
        fixed = prepare_groups(cores, plan) if plan.cache_merged else None

    def run() -> None:
        with torch.no_grad():
            tt_linear(x, fixed if fixed is not None else prepare_groups(cores, plan), plan, scratch=True)
    return run


def _measure(p: TTLinearProblem):
    """``plan -> seconds`` on the problem's device, with random operands of the problem's shapes (for autotuning)."""
    def measure(plan: ContractionPlan) -> float:
        return time_call(plan_call(p, plan, *random_operands(p)), torch.device(p.device))
    return measure


def plan_tt_linear(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    batch: int,
    *,
    cache_merged: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_limit: int = 1 << 22,
    model: CostModel | None = None,
    force: str | None = None,
    training: bool = False,
    input_grad: bool = True,
    autotune: bool | None = None,
) -> ContractionPlan:
    """Cheapest plan for ``(batch, ∏n) -> (batch, ∏m)``, cached on every argument.

    ``cache_merged``: merged groups will be reused across calls, so their cost is not counted — but only for plans
    whose merged tensors hold at most ``cache_limit`` elements in total (a compressed layer must stay small).
    ``force``: a strategy name (``strategy_names("tt_linear")``: ``"auto"``, ``"dense"``, ``"rtl"``, ``"ltr"``); unknown names
    raise. ``training``: price forward + backward (gradients flow to the cores), which makes merging dearer;
    ``input_grad``: whether the input needs a gradient too (in training).
    ``model``: the cost model (default: the one registered for ``device``'s type). ``autotune``: measure the best
    candidates on ``device`` (default: :func:`~torchtn.core.contraction.autotune_enabled`).
    """
    device = torch.device(device)
    problem = TTLinearProblem(tuple(in_shape), tuple(out_shape), tuple(ranks), size_hint(batch), dtype, str(device),
                              bool(training), bool(training and input_grad), bool(cache_merged), int(cache_limit))
    return make_plan(KIND, force or "auto", problem, cost_model=model, device=device,
                     measure=_measure(problem), autotune=autotune, anchors=lambda plan: plan.is_dense)


def plan_for(cores: Sequence[torch.Tensor], batch: int, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, needs_grad: bool = False, input_grad: bool = True,
             contraction: str = "auto", cache_merged: bool = False, cost_model: CostModel | None = None,
             autotune: bool | None = None) -> ContractionPlan:
    """The plan for these cores (their shapes and current ranks) and a batch of ``batch`` rows."""
    out_shape, in_shape = tt_shapes(cores)
    ref = cores[0]
    return plan_tt_linear(in_shape, out_shape, tt_ranks(cores), batch, cache_merged=cache_merged,
                          dtype=ref.dtype if dtype is None else dtype, device=ref.device if device is None else device,
                          model=cost_model, force=contraction, training=needs_grad, input_grad=input_grad,
                          autotune=autotune)


def merge_group(cores: Sequence[torch.Tensor], span: Span) -> torch.Tensor:
    """Merge cores ``span[0] … span[1]−1`` into one core ``(r_a, ∏m, ∏n, r_b)`` (:func:`merge_cores`). Differentiable."""
    return merge_cores(cores[span[0]:span[1]])


def prepare_groups(cores: Sequence[torch.Tensor], plan: ContractionPlan) -> list[torch.Tensor]:
    """The matrices each step multiplies with (merged, reshaped and — for ``ltr`` — permuted cores)."""
    mats = []
    for span in plan.groups:
        g = merge_group(cores, span)
        ra, m, n, rb = g.shape
        if plan.direction == "rtl":
            mats.append(g.reshape(ra * m, n * rb))
        else:
            mats.append(g.permute(1, 3, 0, 2).reshape(m * rb, ra * n))
    return mats


def _bmm(mat: torch.Tensor, t3: torch.Tensor) -> torch.Tensor:
    """``mat (a, k) @ t3 (P, k, c) -> (P, a, c)`` as one batched GEMM on a stride-0 view of ``mat``.

    ``torch.matmul`` folds this case into a GEMM on transposed copies of ``t3`` and of the result (and of their
    gradients in the backward pass); measured here, those copies cost as much as the products.
    """
    return torch.bmm(mat.expand(t3.shape[0], -1, -1), t3)


class _Scratch(threading.local):
    """Per-thread scratch buffers for inference intermediates (two, used alternately by consecutive steps)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


_SCRATCH = _Scratch()
SCRATCH_MIN_NUMEL = 1 << 18  # intermediates at least this big (1 MiB in fp32) are written into scratch buffers


def scratch_buffer(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat per-thread buffer of at least ``numel`` elements, reused across calls (grown, never shrunk;
    :func:`release_scratch` frees them). Only for intermediates that no backward formula keeps. Slots: 0–1 the
    inference sweeps of ``tt_linear`` and the t-linear layer, and the ADTN forward passes; 2–5 the ADTN backward;
    6 and up its recomputed pass inputs."""
    key = (slot, dtype, device)
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.buffers.pop(key, None)  # free the old one before allocating the bigger one
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH.buffers[key] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's inference scratch buffers (they are otherwise kept for the next call)."""
    _SCRATCH.buffers.clear()


def _step(mat: torch.Tensor, t: torch.Tensor, cols: int, slot: int | None = None) -> torch.Tensor:
    a, k = mat.shape
    rows = t.numel() // (k * cols)
    out = None
    if slot is not None and rows * a * cols >= SCRATCH_MIN_NUMEL:
        out = scratch_buffer(slot, rows * a * cols, t.dtype, t.device)
    if cols == 1:
        return torch.mm(t.reshape(-1, k), mat.T, out=None if out is None else out.view(rows, a))
    t3 = t.reshape(-1, k, cols)
    if out is None:
        return _bmm(mat, t3)
    return torch.bmm(mat.expand(rows, -1, -1), t3, out=out.view(rows, a, cols))


def _sweep(x: torch.Tensor, mats: Sequence[torch.Tensor], plan: ContractionPlan, scratch: bool = False) -> torch.Tensor:
    """Run the plan's steps. ``scratch`` (inference only): intermediates go into reused per-thread buffers — a fresh
    allocation of tens of MiB costs as much as the product (the pages are faulted in on every call); the result never
    does."""
    t = x
    last = len(plan.steps) - 1
    for i, (gi, cols) in enumerate(plan.steps):
        t = _step(mats[gi], t, cols, i % 2 if scratch and i < last else None)
    return _reshaped_product(t, (x.shape[0], math.prod(plan.out_sizes)))


def _reshaped_product(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A fresh contiguous product that nothing else holds, as ``shape`` — not as a view of it (what ``torch.matmul``
    does too): a layer's output that is a view drops FSDP2's pre-backward hook when modified in place (``out += x``),
    and FSDP2 warns about it; ``nn.Linear``'s output for a 2-D input is no view either."""
    if tuple(t.shape) == tuple(shape):
        return t
    return torch.ops.aten._unsafe_view(t, list(shape))


def tt_linear(x: torch.Tensor, mats: Sequence[torch.Tensor], plan: ContractionPlan, *,
              scratch: bool = False) -> torch.Tensor:
    """``(batch, ∏n) -> (batch, ∏m)`` through the group matrices that :func:`prepare_groups` made for ``plan``.

    ``scratch`` (only without gradients): write big intermediates into reused per-thread buffers."""
    if x.dim() != 2 or x.shape[1] != math.prod(plan.in_sizes):
        raise ValueError(f"x has shape {tuple(x.shape)}: the plan expects (batch, {math.prod(plan.in_sizes)})")
    if len(mats) != len(plan.groups):
        raise ValueError(f"the plan has {len(plan.groups)} groups but {len(mats)} matrices were given")
    if plan.ranks:
        for i, (mat, want) in enumerate(zip(mats, plan.mat_shapes())):
            if tuple(mat.shape) != want:
                raise ValueError(f"matrix {i} has shape {tuple(mat.shape)} but the plan (ranks {plan.ranks}) expects "
                                 f"{want}: plan again after a rank change")
    if scratch and torch.is_grad_enabled() and (x.requires_grad or any([m.requires_grad for m in mats])):
        raise ValueError("scratch=True is only for calls without gradients (its buffers are overwritten)")
    return _sweep(x, mats, plan, scratch)


class MergedCache:
    """A layer's memo between calls: its plans per call signature, and merged step matrices for inference.

    Plans are memoized per (batch, dtype, device, grad mode, strategy, cost model, autotune setting, core shapes), so
    a call that repeats skips the planner entirely. Merged matrices are keyed on the plan (grouping, ranks) and each
    core's storage and ``_version`` (bumped by in-place updates such as optimizer steps and ``load_state_dict``) — so
    a rank change or a device move can never serve stale data. Every entry is one tuple, replaced whole, so threads
    calling the same layer at once never see a key with another call's matrices.
    """

    __slots__ = ("entry", "plans", "last")

    def __init__(self) -> None:
        self.entry: tuple[tuple, list[torch.Tensor]] | None = None  # (key, merged matrices)
        self.plans: dict[tuple, ContractionPlan] = {}
        # the last gradient-free call, so that a repeated inference call skips the planner and the cache lookups
        # (~10 µs of Python, as much as a small layer's GEMM): (input shape, dtype, (strategy, cost model, autotune,
        # global autotune), [(core, storage, _version) per core], plan, matrices), see :meth:`repeat`
        self.last: tuple | None = None

    @property
    def mats(self) -> list[torch.Tensor]:
        """The merged matrices held now (empty when none)."""
        return [] if self.entry is None else self.entry[1]

    def clear(self) -> None:
        self.entry, self.plans, self.last = None, {}, None

    def repeat(self, x: torch.Tensor, cores: Iterable[torch.Tensor], bias: torch.Tensor | None,
               strategy: tuple) -> torch.Tensor | None:
        """``x Wᵀ + bias`` if this gradient-free call repeats the last one — same input shape and dtype, the same
        ``strategy`` (contraction, cost model, autotune, global autotune), the very same core tensors untouched since
        (storage and ``_version``) — else ``None``.

        The whole check is a few attribute reads: a layer between others runs with its Python objects out of the CPU
        caches, where each read costs a memory access, and every read here was measured (~30 µs of a 784×256
        layer's ~200 µs call at batch 64 before this path, with the caches cold)."""
        last = self.last
        if last is None or torch.is_grad_enabled() or traced():
            return None
        shape, dtype, held_strategy, held, plan, mats = last
        # (no device check: the kept matrices are on the cores' device, where the input must be anyway — a move
        # of the layer clears the cache — and a stray input fails in F.linear as it would on the planned path)
        if x.shape != shape or x.dtype != dtype or held_strategy != strategy:
            return None
        n = 0
        for c, (h, ptr, version) in zip(cores, held):
            if c is not h or c._version != version or c.data_ptr() != ptr:
                return None
            n += 1
        if n != len(held):
            return None
        return _run(x, mats, plan, bias, scratch=True)

    def get(self, cores: Sequence[torch.Tensor], plan: ContractionPlan) -> list[torch.Tensor]:
        # storage and version identify the values (a move, a cast or ``.data =`` changes the storage; in-place
        # updates bump the version); the plan identifies the grouping and — through its ranks — the shapes
        key = (plan, *[(c.data_ptr(), c._version) for c in cores])
        entry = self.entry
        if entry is None or entry[0] != key:
            with kept():
                entry = (key, prepare_groups(cores, plan))
            self.entry = entry
        return entry[1]


def tt_linear_apply(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *,
                    contraction: str = "auto", cost_model: CostModel | None = None,
                    cache: MergedCache | None = None, autotune: bool | None = None) -> torch.Tensor:
    """``(*, ∏n) -> (*, ∏m)``: ``x Wᵀ + bias`` for the TT-matrix ``cores``, planned and executed.

    Plans are cached per (shapes, ranks, batch, dtype, device, grad mode, strategy). With a ``cache`` the plan is
    also memoized per call signature, and — when the cores need no gradient — merged groups are reused between calls.
    """
    inference = not torch.is_grad_enabled() and not traced()  # scratch buffers allowed
    fast = cache is not None and inference
    # (plan_epoch: a new cost model for the device or autotune setting reaches plans memoized in ``cache``)
    strategy = (contraction, cost_model, autotune, plan_epoch())
    if fast:  # inference: a call like the last one reuses its plan and matrices outright
        y = cache.repeat(x, cores, bias, strategy)
        if y is not None:
            return y
    check_input(x, cores[0])  # (a repeated call above was checked the first time)
    in_features = 1
    for c in cores:
        in_features *= c.shape[2]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected in_features={in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    batch = x2.shape[0]
    # torch.jit.trace records one graph for every later call (and checks it against a second run, possibly in
    # another grad mode): the plan must not depend on the grad mode there — the inference plan, whose ops are as
    # differentiable as any
    needs_grad = torch.is_grad_enabled() and any([c.requires_grad for c in cores]) and not jit_tracing()
    input_grad = needs_grad and x.requires_grad
    if batch == 0:  # nothing to contract; the empty output still depends on the input and parameters, as F.linear's
        y = x.new_zeros(*lead, math.prod([int(c.shape[1]) for c in cores]))
        if torch.is_grad_enabled():
            y = y + sum([c.sum() for c in cores], x.sum()) * 0
        return y if bias is None else y + bias
    if cache is not None and not traced():
        key = (batch, x2.dtype, x2.device, needs_grad, input_grad, strategy, tuple([c.shape for c in cores]))
        plan = cache.plans.get(key)
        if plan is None:
            plan = cache.plans[key] = plan_for(cores, batch, dtype=x2.dtype, device=x2.device, needs_grad=needs_grad,
                                               input_grad=input_grad, contraction=contraction,
                                               cache_merged=not needs_grad, cost_model=cost_model, autotune=autotune)
        mats = cache.get(cores, plan) if plan.cache_merged else prepare_groups(cores, plan)
    else:
        plan = plan_for(cores, batch, dtype=x2.dtype, device=x2.device, needs_grad=needs_grad, input_grad=input_grad,
                        contraction=contraction, cache_merged=False, cost_model=cost_model, autotune=autotune)
        mats = prepare_groups(cores, plan)
    if fast and plan.cache_merged:
        cache.last = (x.shape, x.dtype, strategy, [(c, c.data_ptr(), c._version) for c in cores], plan, mats)
    return _run(x, mats, plan, bias, scratch=inference)


def _run(x: torch.Tensor, mats: Sequence[torch.Tensor], plan: ContractionPlan, bias: torch.Tensor | None,
         scratch: bool = False) -> torch.Tensor:
    """``(*, ∏n) -> (*, ∏m)`` through a plan's step matrices, plus the bias."""
    if plan.is_dense:
        return F.linear(x, mats[0], bias)
    y = _sweep(x.reshape(-1, x.shape[-1]), mats, plan, scratch)
    if bias is not None:
        y = y.add_(bias)  # y is a fresh product (never scratch) that no backward formula needs
    return _reshaped_product(y, (*x.shape[:-1], y.shape[-1]))


def tt_linear_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], batch: int = 1,
                    direction: str = "ltr") -> int:
    """FLOPs (2 × multiply-adds) of ``(batch, ∏n) -> (batch, ∏m)`` contracted core by core, nothing merged.

    For ``"ltr"`` this is ``2·batch·Σ_k r_{k-1} r_k m_k n_k (∏_{j<k} m_j)(∏_{j>k} n_j)`` (Gao et al.'s count);
    compare with ``2·batch·∏m·∏n`` for the dense layer. :func:`plan_tt_linear` reports the chosen plan's own FLOPs.
    """
    groups = tuple((k, k + 1) for k in range(len(in_shape)))
    problem = TTLinearProblem(tuple(in_shape), tuple(out_shape), tuple(ranks), batch)
    return _price(groups, direction, problem, True, DEFAULT_COST_MODEL)[1]

