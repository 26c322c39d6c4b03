"""Contraction planning: every plan computes exactly x Wᵀ; plans are objects keyed on everything they depend on."""
import math

import pytest
import torch
from conftest import random_tt

from torchtn import MPOLinear
from torchtn.core import (
    ContractionPlan,
    CostModel,
    plan_tt_linear,
    prepare_groups,
    set_autotune,
    tt_linear,
    tt_to_dense,
)
from torchtn.core.contraction import (
    TTLinearProblem,
    clear_plan_cache,
    get_cost_model,
    get_strategy,
    plan_cache_info,
    register_strategy,
    set_cost_model,
    strategy_names,
)
from torchtn.core.contraction.tt_linear_plans import _candidates, _spans, fits_dense_memory


@pytest.mark.parametrize("in_shape,out_shape,rank", [((4, 7, 7, 4), (4, 4, 4, 4), 3), ((2, 3, 4), (5, 1, 2), 4),
                                                     ((1, 2, 5, 1), (4, 4, 4, 4), 2), ((6,), (3,), 1)])
@pytest.mark.parametrize("direction", ["rtl", "ltr"])
def test_every_plan_equals_dense(in_shape, out_shape, rank, direction):
    cores = random_tt(in_shape, out_shape, rank)
    w = tt_to_dense(cores)
    x = torch.randn(5, math.prod(in_shape), dtype=torch.float64)
    ranks = tuple([1] + [c.shape[3] for c in cores])
    for groups in _spans(len(cores)):
        ins = tuple(math.prod(in_shape[a:b]) for a, b in groups)
        outs = tuple(math.prod(out_shape[a:b]) for a, b in groups)
        plan = ContractionPlan(groups, direction, 5, 0, 0.0, False, 0, ins, outs, ranks)
        y = tt_linear(x, prepare_groups(cores, plan), plan)
        assert torch.allclose(y, x @ w.T, atol=1e-10), (groups, direction)


def test_planner_prefers_sweeps_for_big_low_rank_layers_and_dense_for_tiny_cached_ones():
    big = plan_tt_linear((8, 8, 8, 8), (8, 8, 8, 8), (1, 8, 8, 8, 1), 64)
    assert not big.is_dense and big.flops < 2 * 64 * 4096 * 4096 / 3
    tiny = plan_tt_linear((2, 2), (2, 2), (1, 4, 1), 64, cache_merged=True)
    assert tiny.is_dense and tiny.cache_merged
    forced = plan_tt_linear((8, 8, 8, 8), (8, 8, 8, 8), (1, 8, 8, 8, 1), 64, force="dense")
    assert forced.is_dense and "dense weight" in str(forced)


def test_step_overhead_is_charged_per_inference_step_only():
    """Each planned step costs ``step_overhead`` on top of its product in inference (a small cached layer at batch 1
    is then best served by its cached dense weight), and nothing in training."""
    shapes = ((4, 7, 7, 4), (4, 4, 4, 4), (1, 8, 8, 8, 1), 1)
    free = CostModel(step_overhead=0.0)
    for force in ("rtl", "ltr", "dense"):
        base = plan_tt_linear(*shapes, cache_merged=True, model=free, force=force)
        charged = plan_tt_linear(*shapes, cache_merged=True, model=CostModel(step_overhead=1e-3), force=force)
        assert charged.seconds == pytest.approx(base.seconds + 1e-3 * len(base.steps))
        trained = [plan_tt_linear(*shapes, training=True, model=CostModel(step_overhead=s), force=force).seconds
                   for s in (0.0, 1e-3)]
        assert trained[0] == trained[1]
    assert not plan_tt_linear(*shapes, cache_merged=True, model=free).is_dense
    assert plan_tt_linear(*shapes, cache_merged=True).is_dense


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


def test_unknown_strategy_names_raise():
    assert set(strategy_names("tt_linear")) == {"auto", "dense", "rtl", "ltr"}
    with pytest.raises(ValueError, match="contraction='fastest'.*'auto'"):
        plan_tt_linear((4, 4), (4, 4), (1, 4, 1), 8, force="fastest")
    with pytest.raises(ValueError, match="contraction='autp'"):
        MPOLinear(16, 16, 2, contraction="autp")
    with pytest.raises(ValueError, match="kind='tt_lienar' is not a contraction kind: expected one of .*'tt_linear'"):
        strategy_names("tt_lienar")  # (it answered () — no strategies)


def test_a_registered_strategy_is_replaced_only_when_asked(monkeypatch):
    from torchtn.core.contraction import planner

    monkeypatch.setattr(planner, "_STRATEGIES", {k: dict(v) for k, v in planner._STRATEGIES.items()})
    dense = get_strategy("tt_linear", "dense")
    with pytest.raises(ValueError, match="strategy 'dense' of tt_linear is registered already .*replace=True"):
        register_strategy("tt_linear", "dense")(lambda problem, model: [])  # (it silently swapped the built-in)
    assert get_strategy("tt_linear", "dense") is dense
    register_strategy("tt_linear", "dense")(dense)  # the same function again: nothing to replace
    mine = register_strategy("tt_linear", "dense", replace=True)(lambda problem, model: dense(problem, model))
    assert get_strategy("tt_linear", "dense") is mine


def test_an_autotune_setting_the_environment_cannot_mean_warns(monkeypatch):
    from torchtn.core.contraction import autotune

    monkeypatch.setenv("TORCHTN_AUTOTUNE", "maybe")
    with pytest.warns(UserWarning, match="TORCHTN_AUTOTUNE='maybe' is not understood .*autotuning stays off"):
        assert autotune._from_environment() is False
    for value, on in (("1", True), ("ON", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TORCHTN_AUTOTUNE", value)
        assert autotune._from_environment() is on


def test_plans_are_cached_per_key_and_rank_changes_give_new_plans():
    clear_plan_cache()
    args = ((8, 8), (8, 8), (1, 8, 1), 32)
    first = plan_tt_linear(*args)
    assert plan_tt_linear(*args) is first and plan_cache_info()["hits"] >= 1
    assert plan_tt_linear(*args, dtype=torch.float64) is not first  # dtype is in the key
    assert plan_tt_linear(*args, training=True) is not first  # so is the grad mode
    layer = MPOLinear(64, 64, 8, in_shape=(8, 8), out_shape=(8, 8), dtype=torch.float64)
    x = torch.randn(32, 64, dtype=torch.float64)
    before = layer.plan(32, needs_grad=False)
    assert before.ranks == (1, 8, 1)
    layer.set_cores(layer.tt.round(max_rank=3).cores)  # a bond shrinks, as in sweep training
    after = layer.plan(32, needs_grad=False)
    assert after.ranks == (1, 3, 1) and after is not before
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-12)


def test_structural_changes_of_other_modes_are_refused_naming_both():
    """set_cores and cores_override (sweeps) keep the layer's matrix: cores of other modes are refused with both
    mode lists; a layer that cannot run on overridden cores says so; the layer is unchanged after each refusal."""
    layer = MPOLinear(64, 64, 4, in_shape=(8, 8), out_shape=(8, 8), dtype=torch.float64)
    before = layer.to_dense()
    other = MPOLinear(64, 64, 4, in_shape=(4, 16), out_shape=(8, 8), dtype=torch.float64).core_list()
    with pytest.raises(ValueError, match=r"cores of modes \(8, 8\)←\(4, 16\) cannot replace \(8, 8\)←\(8, 8\)"):
        layer.set_cores(other)
    with pytest.raises(ValueError, match=r"override cores make a \(64, 48\) matrix, the layer's is \(64, 64\)"):
        with layer.cores_override([torch.randn(1, 8, 8, 4, dtype=torch.float64),
                                   torch.randn(4, 8, 6, 1, dtype=torch.float64)]):
            pass
    assert torch.equal(layer.to_dense(), before)
    from torchtn import MPOConv2d

    conv = MPOConv2d(4, 4, 3, rank=2)
    with pytest.raises(TypeError, match="MPOConv2d cannot run on overridden cores"):
        with conv.cores_override(conv.core_list()):
            pass


def test_a_plan_checks_its_inputs():
    cores = random_tt((4, 4), (4, 4), 3)
    plan = plan_tt_linear((4, 4), (4, 4), (1, 3, 1), 2, force="rtl")
    mats = prepare_groups(cores, plan)
    with pytest.raises(ValueError, match=r"x has shape \(2, 15\)"):
        tt_linear(torch.randn(2, 15, dtype=torch.float64), mats, plan)
    bigger = random_tt((4, 4), (4, 4), 5)
    with pytest.raises(ValueError, match="plan again after a rank change"):
        tt_linear(torch.randn(2, 16, dtype=torch.float64), prepare_groups(bigger, plan), plan)


def test_cost_model_reaches_the_layer():
    # with a huge fixed cost per call, the fewest calls win: everything merged into one GEMM
    slow_calls = CostModel(call_overhead=1.0)
    layer = MPOLinear(1024, 1024, 8, in_shape=(4, 4, 8, 8), out_shape=(4, 4, 8, 8), cost_model=slow_calls)
    default = MPOLinear(1024, 1024, 8, in_shape=(4, 4, 8, 8), out_shape=(4, 4, 8, 8))
    assert layer.plan(64, needs_grad=False).is_dense and not default.plan(64, needs_grad=False).is_dense


def test_a_cost_model_set_for_a_device_type_prices_every_layer_on_it_and_drops_cached_plans():
    """set_cost_model(model, "cpu"): layers without their own model plan with it from the next call (a plan cached
    under the old model is not reused); another device type keeps its own; bad arguments are named."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):  # the matrix products a call runs
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm")
            return func(*args, **(kwargs or {}))

    def products(layer, x):
        with torch.no_grad(), Products() as mode:
            y = layer(x)
        return mode.count, y

    default = get_cost_model("cpu")
    layer = MPOLinear(1024, 1024, 8, in_shape=(4, 4, 8, 8), out_shape=(4, 4, 8, 8)).eval()
    x = torch.randn(64, 1024)
    products(layer, x)  # plans, merges and keeps its groups
    planned, y = products(layer, x)
    assert planned > 1 and not layer.plan(64, needs_grad=False).is_dense
    try:
        set_cost_model(CostModel(call_overhead=1.0), "cpu")  # every call costs a second: one GEMM wins
        assert get_cost_model("cpu").call_overhead == 1.0 and get_cost_model("cuda").call_overhead != 1.0
        assert layer.plan(64, needs_grad=False).is_dense
        products(layer, x)  # (merges W once)
        count, y_dense = products(layer, x)  # the layer's own memo of its last call's plan is not reused
        assert count == 1
        torch.testing.assert_close(y_dense, y, rtol=1e-4, atol=1e-4)
    finally:
        set_cost_model(default, "cpu")
    assert get_cost_model("cpu") is default and not layer.plan(64, needs_grad=False).is_dense
    products(layer, x)
    assert products(layer, x)[0] == planned
    with pytest.raises(TypeError, match="model must be a CostModel, got dict"):
        set_cost_model({"call_overhead": 1.0})
    with pytest.raises(ValueError, match="device_type='' is not allowed"):
        set_cost_model(default, "")


def test_autotuned_choice_is_never_slower_than_the_cost_models_pick():
    set_autotune(True)
    try:
        plan = plan_tt_linear((4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1), 64)
        trained = plan_tt_linear((4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1), 64, training=True)
    finally:
        set_autotune(None)
    for p in (plan, trained):
        assert p.measured_seconds is not None and len(p.measurements) >= 2
        assert p.measured_seconds <= p.model_pick_seconds  # both timed in the same measurement
        assert p.measured_seconds == min(t for _, t in p.measurements)
    assert "measured" in str(plan)
    assert plan_tt_linear((4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1), 64).measured_seconds is None


def test_autotune_environment_variable(monkeypatch):
    from torchtn.core import autotune_enabled

    monkeypatch.setenv("TORCHTN_AUTOTUNE", "1")
    set_autotune(None)  # back to the variable: read now
    assert autotune_enabled()
    monkeypatch.setenv("TORCHTN_AUTOTUNE", "0")
    set_autotune(None)
    assert not autotune_enabled()
    with pytest.raises(TypeError, match="enabled='yes'"):
        set_autotune("yes")


def test_inference_scratch_buffers_give_the_same_result_and_never_leak_into_outputs(monkeypatch):
    from torchtn.core.contraction import release_scratch
    from torchtn.core.contraction import tt_linear_plans as tlp

    monkeypatch.setattr(tlp, "SCRATCH_MIN_NUMEL", 1)  # every intermediate goes through the scratch buffers
    cores = random_tt((4, 7, 7, 4), (4, 4, 4, 4), 3)
    w = tt_to_dense(cores)
    plan = plan_tt_linear((4, 7, 7, 4), (4, 4, 4, 4), (1, 3, 3, 3, 1), 6, force="rtl")
    mats = prepare_groups(cores, plan)
    x1, x2 = (torch.randn(6, 784, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        y1 = tt_linear(x1, mats, plan, scratch=True)
        kept = y1.clone()
        y2 = tt_linear(x2, mats, plan, scratch=True)  # reuses the buffers: the first result must not change
    assert torch.equal(y1, kept)
    assert torch.allclose(y1, x1 @ w.T, atol=1e-10) and torch.allclose(y2, x2 @ w.T, atol=1e-10)
    with torch.inference_mode():  # buffers made outside inference mode are writable inside it, and vice versa
        y3 = tt_linear(x1, mats, plan, scratch=True)
    with torch.no_grad():
        tt_linear(x2, mats, plan, scratch=True)
    assert torch.equal(y3, kept)
    release_scratch()
    with pytest.raises(ValueError, match="scratch=True is only for calls without gradients"):
        tt_linear(x1.requires_grad_(), mats, plan, scratch=True)


def test_repeated_inference_calls_skip_planning_but_follow_core_updates(monkeypatch):
    from torchtn.core.contraction import tt_linear_plans as tlp

    layer = MPOLinear(784, 256, rank=4, in_shape=(4, 7, 7, 4), out_shape=(4, 4, 4, 4)).double().eval()
    x = torch.randn(3, 784, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        calls = []
        monkeypatch.setattr(tlp, "plan_for", lambda *a, **k: calls.append(1))  # would break if it were called
        y = layer(x)
        assert calls == [] and torch.allclose(y, x @ layer.to_dense().T + layer.bias, atol=1e-12)
        layer.cores[1].mul_(2.0)  # an in-place update (bumps the version): the memo must not serve stale matrices
        assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-12)
        monkeypatch.undo()
        x5 = torch.randn(5, 784, dtype=torch.float64)  # another batch size: planned again
        assert torch.allclose(layer(x5), x5 @ layer.to_dense().T + layer.bias, atol=1e-12)


def test_cost_model_prices_page_faults_of_big_fresh_tensors():
    model = CostModel()
    assert model.alloc_seconds((32 << 20) // 4 - 1, 4) == 0.0  # below glibc's mmap threshold: reused heap memory
    big = model.alloc_seconds(64 << 20, 4)
    assert big == pytest.approx((256 << 20) / model.fault_bandwidth)
    assert model.alloc_seconds(128 << 20, 4) == pytest.approx(2 * big)
    # in training every step's output is fresh: the same plan costs more with the faults priced than without
    p = dict(in_shape=(8, 8, 8, 8), out_shape=(8, 8, 8, 8), ranks=(1, 32, 32, 32, 1), batch=256, training=True,
             force="rtl")
    free = CostModel(fault_threshold=1 << 62)
    assert plan_tt_linear(**p, model=model).seconds > plan_tt_linear(**p, model=free).seconds


def test_threads_sharing_one_layer_in_inference_get_their_own_results():
    """Inference from several threads on one layer (different batch sizes, so different plans and merged matrices,
    and scratch buffers per thread) equals the single-threaded results."""
    import threading

    layer = MPOLinear(1024, 1024, rank=8).double().eval()
    inputs = [torch.randn(b, 1024, dtype=torch.float64) for b in (1, 3, 64, 200)]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
    errors = []

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(30):
                if not torch.allclose(layer(inputs[i]), expected[i], atol=1e-12):
                    errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _saved_bytes(fn, params=()) -> int:
    """Bytes of the storages autograd keeps for ``fn()``'s backward (each once), not counting ``params``."""
    saved: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return sum(saved.values())


def test_saved_memory_estimate_bounds_what_autograd_keeps_for_every_training_plan():
    in_shape, out_shape = (4, 7, 7, 4), (4, 4, 4, 4)
    cores = [c.float().requires_grad_() for c in random_tt(in_shape, out_shape, 8)]
    ranks = tuple([1] + [c.shape[3] for c in cores])
    x = torch.randn(64, 784)
    for groups in _spans(4):
        for direction in ("rtl", "ltr"):
            problem = TTLinearProblem(in_shape, out_shape, ranks, 64, training=True, input_grad=False)
            (plan,) = _candidates(problem, CostModel(), [(groups, direction)])
            measured = _saved_bytes(lambda: tt_linear(x, prepare_groups(cores, plan), plan), cores)
            assert measured <= 4 * plan.saved_numel, (groups, direction, measured, plan.saved_numel)


def test_training_plans_stay_within_the_dense_layers_memory_on_a_launch_bound_device():
    # a device where each step costs one launch and arithmetic is nearly free (like the fitted CUDA model) would pick
    # core-by-core sweeps that keep every intermediate: 6.3x the dense layer's memory, measured on an H100
    launch_bound = CostModel(peak_flops=1e15, bandwidth=1e13, call_overhead=3e-5, step_overhead=1e-6, fat=8,
                             fault_threshold=1 << 62)
    torch.manual_seed(0)
    layer = MPOLinear(784, 256, 16, in_shape=(4, 7, 7, 4), out_shape=(4, 4, 4, 4), cost_model=launch_bound)
    dense = torch.nn.Linear(784, 256)
    x = torch.randn(256, 784)
    plan = layer.plan(256, needs_grad=True)
    problem = TTLinearProblem((4, 7, 7, 4), (4, 4, 4, 4), tuple(layer.ranks), 256, training=True, input_grad=False)
    assert fits_dense_memory(problem, plan)
    unconstrained = min(_candidates(problem, launch_bound, [(g, d) for g in _spans(4) for d in ("rtl", "ltr")]),
                        key=lambda p: p.seconds)
    assert not fits_dense_memory(problem, unconstrained)  # the rule changed the pick here

    def total(module):  # parameters, their gradients, two Adam moments, and what autograd saves besides them
        params = list(module.parameters())
        return 4 * sum(p.numel() * 4 for p in params) + _saved_bytes(lambda: module(x), params)

    assert total(layer) <= total(dense)
