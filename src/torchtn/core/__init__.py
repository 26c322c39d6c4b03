"""Math core: the TT-matrix type, tensor-train algebra and contraction planning. Pure tensor math; no ``torch.nn``."""
from .contraction import (
    ContractionPlan,
    CostModel,
    MergedCache,
    autotune_enabled,
    clear_plan_cache,
    get_cost_model,
    make_plan,
    merge_group,
    plan_for,
    plan_tt_linear,
    prepare_groups,
    register_strategy,
    release_scratch,
    set_autotune,
    set_cost_model,
    strategy_names,
    tt_linear,
    tt_linear_apply,
    tt_linear_flops,
)
from .factorize import default_num_cores, factorize, prime_factors, resolve_shapes, suggest_shapes
from .mprod import Transform, mprod, mtran, t_eye, t_svd, t_svd_truncate, transform
from .svd import randomized_svd, truncated_svd
from .tt import (
    BondInfo,
    TTMatrix,
    balanced,
    bond_caps,
    bond_report,
    bond_spectra,
    check_cores,
    entanglement_entropy,
    inner_ranks,
    left_canonical,
    merge_cores,
    right_canonical,
    spectrum_entropy,
    tt_compression_ratio,
    tt_init_std,
    tt_num_params,
    tt_ranks,
    tt_round,
    tt_shapes,
    tt_svd,
    tt_to_dense,
)
from .weighting import Weighting, two_core_shapes

__all__ = [
    "TTMatrix",
    "ContractionPlan", "CostModel", "MergedCache", "autotune_enabled", "clear_plan_cache",
    "get_cost_model", "make_plan", "merge_group", "plan_for", "plan_tt_linear", "prepare_groups", "register_strategy",
    "release_scratch", "set_autotune", "set_cost_model", "strategy_names", "tt_linear", "tt_linear_apply", "tt_linear_flops",
    "default_num_cores", "factorize", "prime_factors", "resolve_shapes", "suggest_shapes",
    "randomized_svd", "truncated_svd",
    "BondInfo", "bond_caps", "bond_report", "bond_spectra", "check_cores", "entanglement_entropy", "inner_ranks",
    "balanced", "left_canonical", "merge_cores", "right_canonical", "spectrum_entropy", "tt_compression_ratio", "tt_init_std",
    "tt_num_params", "tt_ranks", "tt_round", "tt_shapes", "tt_svd", "tt_to_dense",
    "Weighting", "two_core_shapes",
    "Transform", "mprod", "mtran", "t_eye", "t_svd", "t_svd_truncate", "transform",
]
