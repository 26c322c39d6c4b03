"""Planning and executing ``y = x Wᵀ`` for a TT-matrix ``W`` without forming ``W`` (unless that is cheapest).

*Plan once, run many* (after opt_einsum): :func:`plan_tt_linear` searches every way of merging neighbouring cores into
groups and both sweep directions, prices each with a small cost model of this kind of hardware (matmul efficiency
falls for thin operands; big intermediates are bandwidth-bound; each kernel launch has a fixed cost), and returns the
cheapest as a :class:`ContractionPlan`. :func:`tt_linear` executes a plan. Every step is one (batched) matmul on a
contiguous view, so no intermediate is ever permuted:

* right-to-left (``"rtl"``): the state is ``[batch, n_<g, r, m_≥g]``; group ``g`` contracts ``(n_g, r_g)``;
* left-to-right (``"ltr"``): the state is ``[batch, m_<g, r, n_≥g]``; group ``g`` contracts ``(r_{g-1}, n_g)``.

Merging all cores into one group is the dense path (build ``W``, one GEMM). Merged groups can be cached by the caller
(e.g. a layer in inference) so that their cost is paid once; the planner is told whether that is allowed.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ContractionPlan", "plan_tt_linear", "merge_group", "prepare_groups", "tt_linear", "tt_linear_flops",
           "CostModel"]

Span = tuple[int, int]


@dataclass(frozen=True)
class CostModel:
    """Rough timing model of one CPU/GPU. Only ratios between plans matter, so the constants need not be exact.

    Defaults were fitted to matmul timings on a 2-core x86 machine (torch 2.13, MKL, fp32): ~190 GFLOP/s for fat
    matmuls, ~25 GFLOP/s for batched matmuls whose output has 8 columns, ~15 GB/s effective bandwidth, ~5 µs per call.
    """

    peak_flops: float = 1.9e11
    bandwidth: float = 1.5e10
    call_overhead: float = 5e-6
    fat: int = 64  # an operand side at least this long runs at full speed

    def matmul_seconds(self, batch: int, a: int, k: int, cols: int, itemsize: int) -> float:
        """Time of ``(a, k) @ (batch, k, cols)`` (``cols == 1``: one GEMM ``(batch, k) @ (k, a)``)."""
        flops = 2.0 * batch * a * k * cols
        if cols == 1:  # a plain GEMM with `batch` rows
            sides = (batch, a, k)
            eff = math.prod([min(1.0, s / self.fat) ** 0.5 for s in sides])
        else:
            eff = min(1.0, cols / self.fat) ** 0.9 * min(1.0, a / self.fat) ** 0.3 * min(1.0, k / self.fat) ** 0.3
        traffic = itemsize * (batch * k * cols + batch * a * cols + a * k)
        return max(flops / (self.peak_flops * eff), traffic / self.bandwidth) + self.call_overhead


DEFAULT_COST_MODEL = CostModel()


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

    @property
    def is_dense(self) -> bool:
        return len(self.groups) == 1

    def describe(self) -> str:
        groups = " | ".join(f"{a + 1}" if b - a == 1 else f"{a + 1}–{b}" for a, b in self.groups)
        how = "dense weight (all cores merged)" if self.is_dense else f"{self.direction} sweep over groups [{groups}]"
        cached = self.cache_merged and any([_builds_new_tensor(g, self.direction) for g in self.groups])
        cache = ", merged cores cached" if cached else ""
        return (
            f"{how}{cache}: batch {self.batch}, {self.flops / 1e6:.2f} MFLOP, "
            f"largest intermediate {self.intermediate_numel:,} elements, est. {self.seconds * 1e3:.3f} ms"
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


def _merge_cost(ranks: Sequence[int], out_shape: Sequence[int], in_shape: Sequence[int], span: Span,
                itemsize: int, model: CostModel) -> tuple[float, int]:
    """Seconds and flops of :func:`merge_group` for ``span``: one GEMM and one permuting copy per absorbed core."""
    a, b = span
    seconds, flops = model.call_overhead, 0
    rows = ranks[a] * out_shape[a] * in_shape[a]
    for k in range(a + 1, b):
        cols = out_shape[k] * in_shape[k] * ranks[k + 1]
        seconds += model.matmul_seconds(rows, cols, ranks[k], 1, itemsize)
        flops += 2 * rows * ranks[k] * cols
        rows *= out_shape[k] * in_shape[k]
        seconds += 2 * itemsize * rows * ranks[k + 1] / model.bandwidth + model.call_overhead  # the permute copy
    return seconds, flops


def _price(
    groups: tuple[Span, ...],
    direction: str,
    batch: int,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    cache_merged: bool,
    itemsize: int,
    model: CostModel,
    training: bool = False,
) -> tuple[float, int, int]:
    """Estimated seconds, flops and largest intermediate of one candidate plan.

    With ``training`` every step is priced three times (forward, and the two products of its backward).
    """
    passes = 3 if training else 1
    m = [math.prod(out_shape[a:b]) for a, b in groups]
    n = [math.prod(in_shape[a:b]) for a, b in groups]
    r = [ranks[a] for a, _ in groups] + [1]
    seconds, flops, biggest = 0.0, 0, 0
    for gi, span in enumerate(groups):
        if _builds_new_tensor(span, direction) and not cache_merged:
            ms, mf = _merge_cost(ranks, out_shape, in_shape, span, itemsize, model)
            seconds += passes * ms
            flops += passes * mf
    order = range(len(groups) - 1, -1, -1) if direction == "rtl" else range(len(groups))
    done = 1  # product of finished output modes
    rest = math.prod(n)  # product of untouched input modes
    for gi in order:
        rest //= n[gi]
        if direction == "rtl":
            a, k, cols, prefix = r[gi] * m[gi], n[gi] * r[gi + 1], done, batch * rest
        else:
            a, k, cols, prefix = m[gi] * r[gi + 1], r[gi] * n[gi], rest, batch * done
        seconds += passes * model.matmul_seconds(prefix, a, k, cols, itemsize)
        flops += passes * 2 * prefix * a * k * cols
        biggest = max(biggest, prefix * a * cols)
        done *= m[gi]
    return seconds, flops, biggest


def plan_tt_linear(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    batch: int,
    *,
    cache_merged: bool = False,
    itemsize: int = 4,
    cache_limit: int = 1 << 22,
    model: CostModel = DEFAULT_COST_MODEL,
    force: str | None = None,
    training: bool = False,
) -> ContractionPlan:
    """Cheapest plan for ``(batch, ∏n) -> (batch, ∏m)``.

    ``cache_merged``: merged groups will be reused across calls, so their cost is not counted — but only for plans
    whose merged tensors hold at most ``cache_limit`` elements in total (a compressed layer must stay small).
    ``force``: ``"dense"``, ``"rtl"`` (core by core, right to left) or ``"ltr"`` restricts the search to that plan.
    ``training``: price forward + backward (gradients flow to the cores), which makes merging dearer.
    """
    d = len(in_shape)
    best: ContractionPlan | None = None
    candidates = [(((0, d),), "rtl")] if force == "dense" else [
        (g, direction) for g in _spans(d) for direction in ("rtl", "ltr")
    ]
    if force in ("rtl", "ltr"):
        candidates = [(tuple((k, k + 1) for k in range(d)), force)]
    for groups, direction in candidates:
        if len(groups) == 1 and direction == "ltr":
            continue  # the same dense plan as "rtl"
        merged = sum([ranks[a] * math.prod(out_shape[a:b]) * math.prod(in_shape[a:b]) * ranks[b] for a, b in groups
                      if _builds_new_tensor((a, b), direction)])
        can_cache = cache_merged and merged <= cache_limit
        seconds, flops, biggest = _price(groups, direction, batch, in_shape, out_shape, ranks, can_cache, itemsize, model,
                                         training)
        if best is None or seconds < best.seconds:
            best = ContractionPlan(groups, direction, batch, flops, seconds, can_cache, biggest,
                                   tuple([math.prod(in_shape[a:b]) for a, b in groups]),
                                   tuple([math.prod(out_shape[a:b]) for a, b in groups]))
    assert best is not None
    return best


def merge_group(cores: Sequence[torch.Tensor], span: Span) -> torch.Tensor:
    """Merge cores ``span[0] … span[1]−1`` into one core ``(r_a, ∏m, ∏n, r_b)``. Differentiable."""
    a, b = span
    acc = cores[a]
    for g in cores[a + 1 : b]:
        ra, mm, nn, r = acc.shape
        _, m, n, rb = g.shape
        acc = (acc.reshape(-1, r) @ g.reshape(r, -1)).reshape(ra, mm, nn, m, n, rb)
        acc = acc.permute(0, 1, 3, 2, 4, 5).reshape(ra, mm * m, nn * n, rb)
    return acc


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


def tt_linear(x: torch.Tensor, mats: Sequence[torch.Tensor], plan: ContractionPlan) -> torch.Tensor:
    """``(batch, ∏n) -> (batch, ∏m)`` through the group matrices that :func:`prepare_groups` made for ``plan``."""
    in_sizes, out_sizes = plan.in_sizes, plan.out_sizes
    batch = x.shape[0]
    t = x
    if plan.direction == "rtl":
        done = 1
        for gi in range(len(mats) - 1, -1, -1):
            mat = mats[gi]
            k = mat.shape[1]
            if done == 1:
                t = t.reshape(-1, k) @ mat.T
            else:
                t = torch.matmul(mat, t.reshape(-1, k, done))
            done *= out_sizes[gi]
    else:
        rest = math.prod(in_sizes)
        for gi, mat in enumerate(mats):
            rest //= in_sizes[gi]
            k = mat.shape[1]
            if rest == 1:
                t = t.reshape(-1, k) @ mat.T
            else:
                t = torch.matmul(mat, t.reshape(-1, k, rest))
    return t.reshape(batch, -1)


def tt_linear_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], batch: int = 1,
                    direction: str = "ltr") -> int:
    """FLOPs (2 × multiply-adds) of ``(batch, ∏n) -> (batch, ∏m)`` contracted core by core, nothing merged.

    For ``"ltr"`` this is ``2·batch·Σ_k r_{k-1} r_k m_k n_k (∏_{j<k} m_j)(∏_{j>k} n_j)`` (Gao et al.'s count);
    compare with ``2·batch·∏m·∏n`` for the dense layer. :func:`plan_tt_linear` reports the chosen plan's own FLOPs.
    """
    groups = tuple((k, k + 1) for k in range(len(in_shape)))
    return _price(groups, direction, batch, in_shape, out_shape, ranks, True, 4, DEFAULT_COST_MODEL)[1]
