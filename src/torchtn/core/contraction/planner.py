"""Plan once, run many: the strategy registry and the plan cache shared by every contraction kind.

A *problem* is a frozen description of one contraction (shapes, ranks, batch, dtype, device, grad mode). A
*strategy* is a small function ``(problem, cost_model) -> candidate plans`` registered under a kind (``"tt_linear"``
today; ADTN gate networks and attention register theirs) and a name. :func:`make_plan` runs the strategy, prices the
candidates with the device's :class:`~.cost.CostModel`, optionally measures the best few on the device
(:mod:`.autotune`), and caches the winner under a key holding everything the plan depends on.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .._tracing import traced
from .autotune import AUTOTUNE_CANDIDATES, autotune_enabled
from .cost import CostModel, get_cost_model

__all__ = ["register_strategy", "strategy_names", "get_strategy", "make_plan", "clear_plan_cache", "plan_epoch", "plan_cache_info",
           "Plan", "MeasuredPlan"]


class Plan(Protocol):
    """What the planner needs of every kind's plans: the cost model's estimate, a readable description, and a copy
    carrying autotuning measurements."""

    seconds: float

    def describe(self) -> str: ...

    def with_measurements(self, seconds: float, measurements: tuple, model_pick_seconds: float) -> "Plan": ...


@dataclass(frozen=True, kw_only=True)
class MeasuredPlan:
    """Base of plan dataclasses: the autotuning record :func:`make_plan` attaches (``with_measurements``)."""

    measured_seconds: float | None = None  # this plan's time on the device, when autotuned
    model_pick_seconds: float | None = None  # … and the cost model's own pick's, in the same measurement
    measurements: tuple = ()  # (description, seconds) of every timed candidate

    def with_measurements(self, seconds: float, measurements: tuple, model_pick_seconds: float):
        return replace(self, measured_seconds=seconds, measurements=measurements,
                       model_pick_seconds=model_pick_seconds)

    def measured_tail(self) -> str:
        """``", measured 1.23 ms"`` for an autotuned plan, else ``""`` (for ``describe``)."""
        return f", measured {1e3 * self.measured_seconds:.3f} ms" if self.measured_seconds is not None else ""


Strategy = Callable[[Any, CostModel], Sequence[Plan]]
_STRATEGIES: dict[str, dict[str, Strategy]] = {}
_CACHE: OrderedDict[Hashable, Plan] = OrderedDict()
_CACHE_SIZE = 4096
_stats = {"hits": 0, "misses": 0}


def register_strategy(kind: str, name: str, *, replace: bool = False) -> Callable[[Strategy], Strategy]:
    """Decorator: register ``fn(problem, cost_model) -> [plans]`` as strategy ``name`` of contraction ``kind``. A name
    taken already raises (``replace=True`` swaps it, e.g. a tuned strategy in place of a built-in one); plans made by
    the old one are dropped."""
    def deco(fn: Strategy) -> Strategy:
        known = _STRATEGIES.setdefault(kind, {})
        if name in known and known[name] is not fn:
            if not replace:
                raise ValueError(f"strategy {name!r} of {kind} is registered already ({known[name].__qualname__}); "
                                 f"pass replace=True to swap it for {getattr(fn, '__qualname__', fn)!r}")
            clear_plan_cache()
        known[name] = fn
        return fn
    return deco


def strategy_names(kind: str) -> tuple[str, ...]:
    """Registered strategy names of ``kind`` (the values a layer's ``contraction=`` accepts); an unknown kind raises
    ``ValueError`` naming the known ones."""
    if kind not in _STRATEGIES:
        raise ValueError(f"kind={kind!r} is not a contraction kind: expected one of "
                         f"{', '.join(map(repr, sorted(_STRATEGIES)))}")
    return tuple(_STRATEGIES[kind])


def get_strategy(kind: str, name: str) -> Strategy:
    """The strategy ``name`` of ``kind``; an unknown name raises ``ValueError`` listing the known ones."""
    known = _STRATEGIES.get(kind, {})
    if name not in known:
        raise ValueError(f"contraction={name!r} is not allowed for {kind}: expected one of "
                         f"{', '.join(map(repr, known))}")
    return known[name]


_epoch = [0]  # bumped by clear_plan_cache: plans memoized outside this cache (a layer's) are keyed on it


def clear_plan_cache() -> None:
    """Forget every cached plan (after changing cost models or the autotune setting) and reset the statistics; plans a
    layer memoized for its own calls are made again too (their keys hold :func:`plan_epoch`)."""
    _CACHE.clear()
    _stats.update(hits=0, misses=0)
    _epoch[0] += 1


def plan_epoch() -> int:
    """How many times every plan has been forgotten (:func:`clear_plan_cache`): part of the key of any plan kept
    outside the planner's cache, so that a new cost model or autotune setting reaches it."""
    return _epoch[0]


def plan_cache_info() -> dict[str, int]:
    """Hits, misses and size of the plan cache."""
    return {**_stats, "size": len(_CACHE)}


def make_plan(kind: str, strategy: str, problem: Hashable, *, cost_model: CostModel | None = None,
              device: Any = None, measure: Callable[[Plan], float] | None = None,
              autotune: bool | None = None, anchors: Callable[[Plan], bool] | None = None) -> Plan:
    """The cheapest plan of ``problem`` under ``strategy``, cached on every input it depends on.

    ``measure(plan) -> seconds`` times a candidate on the device; it is used (on the ``AUTOTUNE_CANDIDATES``
    cheapest candidates by the cost model, plus every candidate for which ``anchors(plan)`` is true — plans that a
    cost model tends to misprice, such as a cached dense weight) when autotuning is on. The chosen plan carries its
    measurements.
    """
    fn = get_strategy(kind, strategy)
    model = cost_model if cost_model is not None else get_cost_model(device)
    tune = autotune_enabled() if autotune is None else autotune
    if traced():
        # traced: plan from the cost model alone and never read the plan cache — dynamo would guard on the cache's
        # keys (seen on CUDA with torch 2.11: a guard on "list(_CACHE.keys())[34]…" failed once the cache changed)
        plan = None
        for candidate in fn(problem, model):
            if plan is None or candidate.seconds < plan.seconds:
                plan = candidate
        return plan
    key = (kind, strategy, problem, model, tune and measure is not None)
    plan = _CACHE.get(key)
    if plan is not None:
        _stats["hits"] += 1
        _CACHE.move_to_end(key)
        return plan
    _stats["misses"] += 1
    candidates = sorted(fn(problem, model), key=lambda p: p.seconds)
    if not candidates:
        raise ValueError(f"strategy {strategy!r} produced no plan for {problem}")
    plan = candidates[0]
    if tune and measure is not None and len(candidates) > 1:
        shortlist = candidates[:AUTOTUNE_CANDIDATES]
        shortlist += [p for p in candidates[AUTOTUNE_CANDIDATES:] if anchors is not None and anchors(p)]
        timed = [(measure(p), i, p) for i, p in enumerate(shortlist)]
        measured = tuple((p.describe(), t) for t, _, p in timed)
        best_t, _, best = min(timed)
        plan = best.with_measurements(best_t, measured, model_pick_seconds=timed[0][0])
    _CACHE[key] = plan
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan
