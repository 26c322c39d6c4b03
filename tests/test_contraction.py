"""Every contraction plan computes exactly x Wᵀ; plans are cached, never re-made per call."""
import math

import pytest
import torch
from conftest import random_tt

from torchtn.core import ContractionPlan, plan_tt_linear, prepare_groups, tt_linear, tt_to_dense
from torchtn.core.contraction import _spans


@pytest.mark.parametrize("in_shape,out_shape,rank", [((4, 7, 7, 4), (4, 4, 4, 4), 3), ((2, 3, 4), (5, 1, 2), 4),
                                                     ((1, 2, 5, 1), (4, 4, 4, 4), 2), ((6,), (3,), 1)])
@pytest.mark.parametrize("direction", ["rtl", "ltr"])
def test_every_plan_equals_dense(in_shape, out_shape, rank, direction):
    cores = random_tt(in_shape, out_shape, rank)
    w = tt_to_dense(cores)
    x = torch.randn(5, math.prod(in_shape), dtype=torch.float64)
    ranks = [1] + [c.shape[3] for c in cores]
    for groups in _spans(len(cores)):
        ins = tuple(math.prod(in_shape[a:b]) for a, b in groups)
        outs = tuple(math.prod(out_shape[a:b]) for a, b in groups)
        plan = ContractionPlan(groups, direction, 5, 0, 0.0, False, 0, ins, outs)
        y = tt_linear(x, prepare_groups(cores, plan), plan)
        assert torch.allclose(y, x @ w.T, atol=1e-10), (groups, direction)
    chosen = plan_tt_linear(in_shape, out_shape, ranks, 5)
    assert chosen.groups in _spans(len(cores)) and chosen.direction in ("rtl", "ltr")


def test_planner_prefers_sweeps_for_big_low_rank_layers_and_dense_for_tiny_cached_ones():
    big = plan_tt_linear((8, 8, 8, 8), (8, 8, 8, 8), (1, 8, 8, 8, 1), 64)
    assert not big.is_dense and big.flops < 2 * 64 * 4096 * 4096 / 3
    tiny = plan_tt_linear((2, 2), (2, 2), (1, 4, 1), 64, cache_merged=True)
    assert tiny.is_dense and tiny.cache_merged
    forced = plan_tt_linear((8, 8, 8, 8), (8, 8, 8, 8), (1, 8, 8, 8, 1), 64, force="dense")
    assert forced.is_dense and "dense weight" in str(forced)


def test_flop_count_matches_gao_formula():
    from torchtn.core import tt_linear_flops

    in_shape, out_shape, ranks = (4, 7, 7, 4), (4, 4, 4, 4), (1, 3, 5, 2, 1)
    expected = 0
    for k in range(4):
        left = math.prod(out_shape[:k])
        right = math.prod(in_shape[k + 1:])
        expected += ranks[k] * ranks[k + 1] * out_shape[k] * in_shape[k] * left * right
    assert tt_linear_flops(in_shape, out_shape, ranks, batch=8) == 2 * 8 * expected
    # the planner reports the same count for the forced core-by-core plan
    plan = plan_tt_linear(in_shape, out_shape, ranks, 8, force="ltr")
    assert plan.flops == 2 * 8 * expected
