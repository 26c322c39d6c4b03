"""Math core: tensor-train algebra and contraction planning. Pure functions on tensors; no ``torch.nn``."""
from .contraction import (
    ContractionPlan,
    CostModel,
    merge_group,
    plan_tt_linear,
    prepare_groups,
    tt_linear,
    tt_linear_flops,
)
from .factorize import default_num_cores, factorize, prime_factors, resolve_shapes, suggest_shapes
from .svd import randomized_svd, truncated_svd
from .tt import (
    BondInfo,
    bond_caps,
    bond_report,
    bond_spectra,
    check_cores,
    entanglement_entropy,
    inner_ranks,
    left_canonical,
    right_canonical,
    spectrum_entropy,
    tt_num_params,
    tt_ranks,
    tt_round,
    tt_shapes,
    tt_svd,
    tt_to_dense,
)

__all__ = [
    "ContractionPlan", "CostModel", "merge_group", "plan_tt_linear", "prepare_groups", "tt_linear", "tt_linear_flops",
    "default_num_cores", "factorize", "prime_factors", "resolve_shapes", "suggest_shapes",
    "randomized_svd", "truncated_svd",
    "BondInfo", "bond_caps", "bond_report", "bond_spectra", "check_cores", "entanglement_entropy", "inner_ranks", "left_canonical", "right_canonical",
    "spectrum_entropy", "tt_num_params", "tt_ranks", "tt_round", "tt_shapes", "tt_svd", "tt_to_dense",
]
