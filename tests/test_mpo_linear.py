"""MPOLinear against exact math: the dense reconstruction, finite differences, PyTorch conventions."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import entropy_reference, unfolding
from torch import nn
from torch.nn.utils import parametrize, prune

import torchtn
from torchtn import MPOLinear, load_model, save_model
from torchtn.core import spectrum_entropy
from torchtn.core.contraction import plan_cache_info
from torchtn.train.sweep import SweepConfig, Sweeper


def make(dtype=torch.float64, **kw):
    args = dict(in_features=784, out_features=256, rank=4)
    args.update(kw)
    return MPOLinear(**args, dtype=dtype)


@pytest.mark.parametrize("contraction", ["auto", "dense", "rtl", "ltr"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_forward_equals_linear_with_dense_weight(contraction, batch):
    layer = make(contraction=contraction)
    x = torch.randn(batch, 784, dtype=torch.float64)
    expected = F.linear(x, layer.to_dense(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-10)
        mats = layer._merged.mats
        assert torch.allclose(layer(x), expected, atol=1e-10)
        plan = layer.plan(batch, needs_grad=False)
        if plan.cache_merged:  # the second call reused the very same merged tensors
            assert layer._merged.mats is mats and len(mats) == len(plan.groups)


def test_float32_paths_agree_to_float32_precision():
    layer = MPOLinear(1024, 1024, 8)
    x = torch.randn(16, 1024)
    ref = F.linear(x.double(), layer.to_dense().double(), layer.bias.double())
    for c in ("dense", "rtl", "ltr", "auto"):
        layer.contraction = c
        err = (layer(x).double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-6, (c, err)  # fp32 eps is 1.2e-7; sums of ~1024 terms


def test_leading_dims_and_empty_batch():
    layer = make()
    x = torch.randn(2, 3, 784, dtype=torch.float64)
    assert torch.allclose(layer(x), F.linear(x, layer.to_dense(), layer.bias), atol=1e-10)
    assert layer(torch.zeros(0, 784, dtype=torch.float64)).shape == (0, 256)


def test_gradcheck():
    layer = MPOLinear(12, 10, 3, in_shape=(2, 3, 2), out_shape=(1, 5, 2), dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, *ps: torch.func.functional_call(
        layer, {f"cores.{i}": p for i, p in enumerate(ps[:-1])} | {"bias": ps[-1]}, (inp,)),
        (x, *[p.detach().clone().requires_grad_() for p in layer.cores], layer.bias.detach().clone().requires_grad_()))


def test_from_dense_full_rank_is_exact_and_truncation_reduces():
    lin = nn.Linear(784, 256, dtype=torch.float64)
    exact = MPOLinear.from_dense(lin)
    assert torch.allclose(exact.to_dense(), lin.weight, atol=1e-10)
    x = torch.randn(3, 784, dtype=torch.float64)
    assert torch.allclose(exact(x), lin(x), atol=1e-10)
    small = MPOLinear.from_dense(lin, rank=4)
    assert small.ranks == (1, 4, 4, 4, 1) and small.compression_ratio == pytest.approx(784 * 256 / (32 * 4 + 56 * 16))
    tol = MPOLinear.from_dense(lin, rel_tol=0.3)
    assert torch.linalg.norm(tol.to_dense() - lin.weight) <= 0.3 * torch.linalg.norm(lin.weight)
    back = small.to_linear()
    assert torch.allclose(back(x), small(x), atol=1e-10)


def test_default_init_matches_nn_linear_output_variance():
    torch.manual_seed(0)
    x = torch.randn(2048, 784)
    dense_var = torch.stack([nn.Linear(784, 256, bias=False)(x).var() for _ in range(8)]).mean()
    mpo_var = torch.stack([MPOLinear(784, 256, 8, bias=False)(x).var() for _ in range(8)]).mean()
    assert mpo_var.item() == pytest.approx(dense_var.item(), rel=0.25)
    w = MPOLinear(4096, 4096, 8).to_dense()
    assert w.var().item() == pytest.approx(1 / (3 * 4096), rel=0.2)


def test_entanglement_entropy_matches_dense_svd():
    layer = make(rank=5)
    w = layer.to_dense().detach()
    for k, ent in enumerate(layer.entanglement_entropy()):
        s = torch.linalg.svdvals(unfolding(w, layer.in_shape, layer.out_shape, k))
        assert ent.item() == pytest.approx(entropy_reference(s.numpy()), abs=1e-8)


def test_plans_are_cached_not_remade():
    from torchtn.core import clear_plan_cache

    clear_plan_cache()
    layer = make()
    x = torch.randn(32, 784, dtype=torch.float64)

    def misses():
        return plan_cache_info()["misses"]

    for _ in range(5):
        layer(x).sum().backward()
    assert misses() == 1
    with torch.no_grad():
        layer(x)
        layer(x)
    layer(x[:5])
    assert misses() == 3  # one more for no-grad, one more for the new batch size
    text = str(layer.plan(32))
    assert "batch 32" in text and "ranks (1, 4, 4, 4, 1)" in text and "MFLOP" in text


def test_cached_weights_follow_parameter_updates():
    layer = MPOLinear(16, 16, 2, dtype=torch.float64).eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.cores[0].add_(1.0)  # in-place update, as an optimizer does
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, F.linear(x, layer.to_dense(), layer.bias), atol=1e-12)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    fresh = MPOLinear(16, 16, 2, dtype=torch.float64).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        fresh(x)
        fresh.load_state_dict({k: v + 1 for k, v in state.items()})
        assert torch.allclose(fresh(x), F.linear(x, fresh.to_dense(), fresh.bias), atol=1e-12)


def test_the_inference_fast_path_never_serves_a_stale_result():
    """A repeated gradient-free call skips the planner (MergedCache.repeat); every way the weight or the strategy
    can change in between must reach the output: each step is checked against the dense reconstruction."""
    torch.manual_seed(0)
    layer = MPOLinear(16, 16, 2, dtype=torch.float64).eval()
    x = torch.randn(4, 16, dtype=torch.float64)

    def check() -> torch.Tensor:
        with torch.no_grad():
            layer(x)  # the first call of a signature plans and keeps; the second takes the fast path
            y = layer(x)
        torch.testing.assert_close(y, F.linear(x, layer.to_dense(), layer.bias), rtol=0, atol=1e-12)
        return y

    outputs = [check()]
    with torch.no_grad():
        layer.cores[1] = nn.Parameter(layer.cores[1] * 2)  # a new core object in the list
    outputs.append(check())
    with torch.no_grad():
        layer.cores[2].data = layer.cores[2].data * 3  # new storage under the same Parameter
    outputs.append(check())
    layer.bias = nn.Parameter(layer.bias + 1)  # a new bias
    outputs.append(check())
    layer.contraction = "rtl"  # another strategy: planned anew, same map
    torch.testing.assert_close(check(), outputs[-1], rtol=0, atol=1e-12)
    other = {n: p * 0.5 for n, p in layer.named_parameters()}
    with torch.no_grad():  # other tensors through torch.func: never the kept matrices of the layer's own
        swapped = torch.func.functional_call(layer, other, (x,))
    half = F.linear(x, torchtn.TTMatrix([other[f"cores.{i}"] for i in range(4)]).to_dense(), other["bias"])
    torch.testing.assert_close(swapped, half, rtol=0, atol=1e-12)
    outputs.append(check())
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, outputs[1:-1]))


def test_dtype_moves_and_state_dict_keys():
    layer = MPOLinear(64, 32, 3)
    assert sorted(layer.state_dict()) == ["bias"] + [f"cores.{i}" for i in range(len(layer.cores))]
    x = torch.randn(3, 64)
    with torch.no_grad():
        y32 = layer(x)
        layer.double()
        y64 = layer(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y32.double(), y64, atol=1e-5)
    assert "ranks=(1, 3, 3, 3, 1)" in repr(layer)


def test_load_state_dict_takes_the_stored_bond_dimensions_in_place():
    torch.manual_seed(0)
    source = MPOLinear(64, 32, [2, 5, 3], dtype=torch.float64)  # e.g. a layer whose bonds a sweep changed
    layer = MPOLinear(64, 32, 4, dtype=torch.float64)
    params = list(layer.parameters())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(7, 64, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        layer(x)  # fills the inference caches of the old bonds
    layer.load_state_dict(source.state_dict())
    assert layer.ranks == source.ranks == (1, 2, 5, 3, 1)
    with torch.no_grad():
        assert torch.equal(layer(x), source(x))
        assert torch.allclose(layer.weight, source.to_dense(), atol=1e-12)
    # the same Parameter objects, resized: an optimizer built before the load trains the loaded layer
    assert all(a is b for a, b in zip(layer.parameters(), params))
    layer.train()
    F.mse_loss(layer(x), torch.zeros(7, 32, dtype=torch.float64)).backward()
    optimizer.step()
    assert not torch.allclose(layer.cores[1], source.cores[1])
    # other modes are not a change of bonds: nn.Module's size-mismatch error, and the layer is untouched
    other = MPOLinear(63, 32, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size mismatch for cores"):
        layer.load_state_dict(other.state_dict())
    assert layer.ranks == (1, 2, 5, 3, 1)


def test_torch_func_grad_matches_autograd():
    layer = MPOLinear(24, 12, 2, dtype=torch.float64)
    params = dict(layer.named_parameters())
    x = torch.randn(5, 24, dtype=torch.float64)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-10)


def test_torch_compile_full_graph_agrees():
    torch._dynamo.reset()
    layer = MPOLinear(64, 32, 3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(8, 64)
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank=0"),
    (dict(rank=-3), "rank=-3"),
    (dict(rank=(2, 2)), "rank=.*entries"),
    (dict(in_shape=(4, 7, 7, 5)), "in_shape=.*multiplies to 980"),
    (dict(in_shape=(28, 28), out_shape=(4, 4, 16)), "same number of modes"),
    (dict(in_features=0), "in_features=0"),
    (dict(contraction="fast"), "contraction='fast'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_input_width():
    with pytest.raises(ValueError, match="in_features=784"):
        make()(torch.randn(2, 783, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        MPOLinear.from_dense(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="rel_tol=2"):
        MPOLinear.from_dense(nn.Linear(4, 4), rel_tol=2)


def test_top_level_api():
    assert {"tt_svd", "tt_to_dense", "tt_round", "MPOLinear", "tensorize", "TTMatrix", "set_autotune"} <= set(
        torchtn.__all__)
    for name in torchtn.__all__:
        assert getattr(torchtn, name) is not None


def test_functional_equals_module():
    from torchtn.functional import mpo_linear

    layer = make(rank=3)
    x = torch.randn(5, 784, dtype=torch.float64, requires_grad=True)
    y_mod = layer(x)
    y_fun = mpo_linear(x, list(layer.cores), layer.bias)
    assert torch.equal(y_mod, y_fun)
    (g_mod,) = torch.autograd.grad(y_mod.sum(), layer.cores[1])
    (g_fun,) = torch.autograd.grad(mpo_linear(x, list(layer.cores), layer.bias).sum(), layer.cores[1])
    assert torch.equal(g_mod, g_fun)
    with pytest.raises(ValueError, match="contraction='nope'"):
        mpo_linear(x, list(layer.cores), contraction="nope")
    with pytest.raises(ValueError, match=r"bias has shape \(255,\): expected \(256,\)"):
        mpo_linear(x, list(layer.cores), layer.bias[:-1])
    with pytest.raises(ValueError, match=r"cores must be a non-empty list of 4-D tensors.*got one tensor of shape \(1, 4, 4, 3\)"):
        mpo_linear(x, layer.cores[0])  # one core tensor, not a list of them


def test_weight_is_read_only_reconstruction_and_bias_keyword_like_nn_linear():
    layer = MPOLinear(64, 32, bias=False, dtype=torch.float64)  # nn.Linear's signature: rank has a default
    assert layer.bias is None and layer.ranks == (1, 8, 8, 1) or max(layer.ranks) <= 8
    w = layer.weight
    assert w.shape == (32, 64) and w.dtype == torch.float64 and w.device.type == "cpu"
    assert torch.equal(w, layer.to_dense())
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-12)
    w.sum().backward()  # in training the weight is differentiable with respect to the cores
    assert layer.cores[0].grad is not None
    layer.eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # cached while the cores do not change
        layer.cores[1].mul_(2)
        assert torch.allclose(layer.weight, 2 * first)
    with pytest.raises(AttributeError, match=r"MPOLinear.weight is read-only.*MPOLinear.from_dense"):
        layer.weight = nn.Parameter(torch.zeros(32, 64, dtype=torch.float64))
    nn.init.zeros_(layer.bias) if layer.bias is not None else None  # init code that reads .bias works unchanged


def test_tt_matrix_type_owns_the_mpo_math():
    from torchtn import TTMatrix

    w = torch.randn(256, 784, dtype=torch.float64)
    tt = TTMatrix.from_dense(w, (4, 7, 7, 4), (4, 4, 4, 4), max_rank=6)
    assert tt.shape == (256, 784) and tt.ranks == (1, 6, 6, 6, 1)
    assert tt.num_params == sum(c.numel() for c in tt.cores)
    assert tt.compression_ratio == pytest.approx(w.numel() / tt.num_params)
    x = torch.randn(7, 784, dtype=torch.float64)
    assert torch.allclose(tt.linear(x), x @ tt.to_dense().T, atol=1e-10)
    rounded = tt.round(max_rank=3)
    assert rounded.ranks == (1, 3, 3, 3, 1)
    s = tt.spectra()
    assert len(s) == 3 and torch.allclose(tt.entanglement_entropy()[1], spectrum_entropy(s[1]))
    layer = MPOLinear.from_cores(tt.cores)
    assert layer.tt.ranks == tt.ranks and torch.allclose(layer.to_dense(), tt.to_dense())
    random = TTMatrix.random((8, 8, 8, 8), (8, 8, 8, 8), 8, variance=1e-3, generator=torch.Generator().manual_seed(0))
    assert random.to_dense().var().item() == pytest.approx(1e-3, rel=0.2)


def test_sizes_without_factors_warn_that_the_mpo_is_one_dense_core():
    with pytest.warns(UserWarning, match=r"MPOLinear\(97, 89\): the sizes have no factors .* rank has no effect"):
        layer = MPOLinear(97, 89, 4)
    assert len(layer.cores) == 1 and layer.compression_ratio == pytest.approx(1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MPOLinear(96, 88, 4)  # factors: no warning
        MPOLinear(97, 89, 4, in_shape=(97,), out_shape=(89,))  # one core asked for


# ---------------------------------------------------------------- cores held by torch.nn.utils.prune / parametrize
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_pruned_cores_compute_train_and_stay_masked_then_are_made_permanent(tmp_path, kind):
    """torch.nn.utils.prune on a core: the layer computes with the masked core (the cores' list is never called,
    so its pruning hook is run at every read); the mask holds through training steps; prune.remove keeps the map
    (it re-registers the core last: order is by index, not registration) and the model saves and loads."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = MPOLinear(48, 20, 3, dtype=torch.float64), torch.randn(6, 48, dtype=torch.float64)
    elif kind == "conv":
        layer = torchtn.MPOConv2d(4, 6, 3, padding=1, rank=3, dtype=torch.float64)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    else:
        layer, x = torchtn.MPOEmbedding(40, 6, rank=3, dtype=torch.float64), torch.randint(0, 40, (5, 3))
    plain = copy.deepcopy(layer)
    prune.l1_unstructured(layer.cores, name="1", amount=0.5)
    masked = layer.cores.get_parameter("1_orig") * layer.cores.get_buffer("1_mask")
    with torch.no_grad():
        plain.cores[1].copy_(masked)
    assert torch.equal(layer.core_list()[1], masked)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    core = layer.core_list()[1]
    assert (core[layer.cores.get_buffer("1_mask") == 0] == 0).all()  # the pruned entries stayed zero
    assert not torch.equal(layer.cores.get_parameter("1_orig") * layer.cores.get_buffer("1_mask"), masked)  # trained
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        with pytest.raises(ValueError, match=r"prune.*cores\.1|cores\.1.*prune"):
            save_model(nn.Sequential(layer), tmp_path / "pruned.safetensors")
        with pytest.raises(ValueError, match=r"prune.remove\(model.get_submodule\('0.cores'\), '1'\)"):
            torchtn.tensorize(nn.Sequential(layer), rank=2)
        with pytest.raises(RuntimeError, match="cores.1 is held by torch.nn.utils.prune"):
            layer.reset_parameters()
        prune.remove(layer.cores, "1")
        assert list(layer.cores._parameters)[-1] == "1"  # out of order in the registry
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
        path = save_model(nn.Sequential(layer), tmp_path / "removed.safetensors")
        back = load_model(path, nn.Sequential(copy.deepcopy(plain)))
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)


def test_a_parametrized_core_is_what_the_layer_computes_with_and_sweeps_refuse_it():
    torch.manual_seed(0)
    layer, x = MPOLinear(48, 20, 3, dtype=torch.float64), torch.randn(6, 48, dtype=torch.float64)
    twice = copy.deepcopy(layer)
    with torch.no_grad():
        twice.cores[2].mul_(2)

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    parametrize.register_parametrization(layer.cores, "2", Double())
    torch.testing.assert_close(layer(x), twice(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight, twice.weight, rtol=1e-12, atol=1e-12)
    assert layer.ranks == twice.ranks
    with pytest.raises(RuntimeError, match=r"trained by sweeps \('0'\).*cores\.2"):
        Sweeper(nn.Sequential(layer), SweepConfig())


def test_pruning_the_computed_weight_names_the_cores_to_prune_instead():
    layer = MPOLinear(48, 20, 3)
    with pytest.raises(TypeError, match=r"MPOLinear.weight cannot be pruned.*cores\.0"):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    assert not layer._forward_pre_hooks and "weight_orig" not in dict(layer.named_parameters())


@pytest.mark.parametrize("contraction", ["auto", "dense", "rtl", "ltr"])
def test_the_output_is_a_view_only_where_nn_linears_is(contraction):
    """A view as a module's output drops FSDP2's pre-backward hook when modified in place (FSDP2 warned about every
    MPOLinear): the sweeps' last product is returned as it is, as nn.Linear returns its 2-D output."""
    layer, dense = make(contraction=contraction), nn.Linear(784, 256, dtype=torch.float64)
    for shape in ((1, 784), (9, 784), (2, 5, 784)):
        x = torch.randn(*shape, dtype=torch.float64)
        for mode in (layer.train, layer.eval):
            mode()
            with torch.set_grad_enabled(layer.training):
                assert dense(x)._is_view() or not layer(x)._is_view(), (shape, layer.training)
