"""Contraction planning: plan objects, a strategy registry, per-device cost models, measured autotuning.

``tt_linear`` (a TT-matrix times a batch of vectors) is the first registered contraction kind; later kinds (ADTN gate
networks, attention) register their strategies with :func:`register_strategy` and plan through :func:`make_plan`.
"""
from .autotune import autotune_enabled, set_autotune, time_call
from .cost import DEFAULT_COST_MODEL, CostModel, get_cost_model, set_cost_model
from .planner import (
    clear_plan_cache,
    get_strategy,
    make_plan,
    plan_cache_info,
    plan_epoch,
    register_strategy,
    strategy_names,
)
from .tt_linear_plans import (
    ContractionPlan,
    MergedCache,
    TTLinearProblem,
    merge_group,
    plan_for,
    plan_tt_linear,
    prepare_groups,
    release_scratch,
    scratch_buffer,
    tt_linear,
    tt_linear_apply,
    tt_linear_flops,
)

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "get_cost_model", "set_cost_model", "set_autotune", "autotune_enabled",
           "time_call", "register_strategy", "strategy_names", "get_strategy", "make_plan", "clear_plan_cache",
           "plan_epoch", "plan_cache_info", "ContractionPlan", "TTLinearProblem", "MergedCache", "merge_group",
           "plan_for", "plan_tt_linear", "prepare_groups", "release_scratch", "scratch_buffer", "tt_linear",
           "tt_linear_apply", "tt_linear_flops"]
