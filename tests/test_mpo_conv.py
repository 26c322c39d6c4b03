"""MPOConv2d against exact math: F.conv2d with the rebuilt kernel, finite differences, nn.Conv2d conventions."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchtn import MPOConv2d, load_model, save_model, tensorize


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, (3, 2)]), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2),
       mapping=st.sampled_from(["matrix", "spatial", "kernel"]),
       contraction=st.sampled_from(["auto", "rebuild", "patches", "sequential"]), seed=st.integers(0, 1000))
def test_forward_equals_conv2d_with_the_rebuilt_kernel(groups, k, stride, padding, dilation, mapping, contraction,
                                                        seed):
    refused = ((contraction == "patches" and (mapping == "spatial" or groups != 1))
               or (contraction == "sequential" and (mapping != "kernel" or groups != 1)))
    if refused:
        with pytest.raises(ValueError, match=contraction):
            MPOConv2d(4, 6, k, groups=groups, mapping=mapping, contraction=contraction)
        return
    torch.manual_seed(seed)
    layer = MPOConv2d(4, 6, k, stride, padding, dilation, groups, rank=3, mapping=mapping, contraction=contraction,
                      dtype=torch.float64)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, layer.to_dense(), layer.bias, stride, padding, dilation, groups)
    assert layer.to_dense().shape == (6, 4 // groups, *((k, k) if isinstance(k, int) else k))
    assert torch.allclose(layer(x), expected, atol=1e-12)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-12)
        assert torch.allclose(layer(x[0]), expected[0], atol=1e-12)  # unbatched input, as nn.Conv2d


@pytest.mark.parametrize("mapping", ["matrix", "spatial", "kernel"])
def test_from_dense_full_rank_is_exact_and_padding_modes_match_nn_conv2d(mapping):
    for padding_mode, padding in (("zeros", 1), ("reflect", 2), ("circular", 1), ("replicate", "same")):
        conv = nn.Conv2d(4, 8, 3, padding=padding, padding_mode=padding_mode, dtype=torch.float64)
        layer = MPOConv2d.from_dense(conv, mapping=mapping)
        assert torch.allclose(layer.to_dense(), conv.weight, atol=1e-12)
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
        assert torch.allclose(layer(x), conv(x), atol=1e-12), padding_mode
        assert torch.allclose(layer.to_conv()(x), conv(x), atol=1e-12)
    big = nn.Conv2d(32, 64, 3, dtype=torch.float64)
    truncated = MPOConv2d.from_dense(big, rel_tol=0.8, mapping=mapping)
    err = torch.linalg.norm(truncated.to_dense() - big.weight) / torch.linalg.norm(big.weight)
    assert err <= 0.8 + 1e-9 and truncated.num_weight_params < big.weight.numel()
    capped = MPOConv2d.from_dense(big, rank=4, mapping=mapping)
    assert max(capped.ranks) == 4 and capped.compression_ratio > 10


def test_gradcheck_and_patches_gradients_equal_rebuild_gradients():
    layer = MPOConv2d(2, 4, 3, padding=1, rank=2, contraction="patches", dtype=torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    assert torch.autograd.gradcheck(lambda inp, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (inp,)),
                                    (x, *params))
    other = MPOConv2d(2, 4, 3, padding=1, rank=2, contraction="rebuild", dtype=torch.float64)
    other.load_state_dict(layer.state_dict())
    layer(x).square().sum().backward()
    other(x).square().sum().backward()
    for a, b in zip(layer.parameters(), other.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_kernel_mapping_is_the_tt_of_the_4d_kernel_and_runs_as_four_small_convolutions():
    layer = MPOConv2d(6, 10, (3, 2), rank=[4, 5, 3], mapping="kernel", dtype=torch.float64)
    assert layer.in_shape == (6, 3, 2, 1) and layer.out_shape == (1, 1, 1, 10) and layer.ranks == (1, 4, 5, 3, 1)
    g0, g1, g2, g3 = (c.detach() for c in layer.cores)  # K[o, c, i, j] = Σ G0[c,a] G1[a,i,b] G2[b,j,d] G3[d,o]
    kernel = torch.einsum("ca,aib,bjd,do->ocij", g0[0, 0], g1[:, 0], g2[:, 0], g3[:, :, 0, 0])
    assert torch.allclose(layer.to_dense(), kernel, atol=1e-12)
    assert layer.num_weight_params == 6 * 4 + 4 * 3 * 5 + 5 * 2 * 3 + 3 * 10
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    for geometry in (dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), dict(padding="same"),
                     dict(padding="valid", stride=2)):
        ways = {c: MPOConv2d(6, 10, (3, 2), rank=[4, 5, 3], mapping="kernel", contraction=c, dtype=torch.float64,
                             **geometry) for c in ("sequential", "rebuild")}
        ways["rebuild"].load_state_dict(layer.state_dict())
        ways["sequential"].load_state_dict(layer.state_dict())
        args = (geometry.get("stride", 1), geometry.get("padding", 0), geometry.get("dilation", 1))
        expected = F.conv2d(x, kernel, layer.bias, *args)
        grads = []
        for way in ways.values():
            y = way(x)
            assert torch.allclose(y, expected, atol=1e-12)
            grads.append(torch.autograd.grad(y.square().sum(), [x, *way.parameters()]))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="modes are fixed"):
        MPOConv2d(6, 10, 3, mapping="kernel", in_shape=(2, 3, 9))
    # tensorize gives every convolution these modes on request; the matrix mapping with them runs the same way
    cnn = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 4, (3, 2), stride=2)).double()
    tt_cnn, _ = tensorize(cnn, rank=4, conv_modes="kernel")
    assert [m.in_shape for m in tt_cnn if isinstance(m, MPOConv2d)] == [(6, 3, 3, 1), (10, 3, 2, 1)]
    for m in tt_cnn:
        if isinstance(m, MPOConv2d):
            m.contraction = "sequential"
    ref = nn.Sequential(tt_cnn[0].to_conv(), nn.ReLU(), tt_cnn[2].to_conv())
    assert torch.allclose(tt_cnn(x.detach()), ref(x.detach()), atol=1e-12)
    # at a strong compression the planner runs the four small convolutions
    big = MPOConv2d(64, 64, 3, padding=1, rank=8, mapping="kernel")
    with torch.no_grad():
        big(torch.randn(4, 64, 16, 16))
    assert "sequential" in big._merged.plans.values()


def test_default_init_matches_nn_conv2d_and_weight_is_read_only():
    torch.manual_seed(0)
    kernels = torch.cat([MPOConv2d(64, 64, 3, rank=8).weight.detach().flatten() for _ in range(4)])
    assert kernels.var().item() == pytest.approx(1 / (3 * 64 * 9), rel=0.25)
    layer = MPOConv2d(8, 8, 3)
    assert layer.weight.shape == (8, 8, 3, 3)
    with pytest.raises(AttributeError, match=r"MPOConv2d.weight is read-only.*MPOConv2d.from_dense"):
        layer.weight = nn.Parameter(torch.zeros(8, 8, 3, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=3), "groups=3"), (dict(padding="full"), "padding='full'"), (dict(mapping="cp"), "mapping='cp'"),
    (dict(padding_mode="mirror"), "padding_mode='mirror'"), (dict(rank=0), "rank=0"),
    (dict(in_shape=(2, 3)), "multiplies to 6"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPOConv2d(4, 8, 3, **kwargs)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (8, 8), (2, 1, 4, 8, 8)])
def test_an_input_with_the_wrong_channels_or_dimensions_is_named_as_a_convolution_input(shape):
    with pytest.raises(ValueError, match=rf"input has shape \({shape[0]}, .*expected \(batch, 4, H, W\) or \(4, H, W\)"):
        MPOConv2d(4, 8, 3, rank=2)(torch.randn(shape))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


def test_tensorize_converts_convolutions_with_one_shared_budget(tmp_path):
    model = small_cnn()
    x = torch.randn(4, 1, 8, 8)
    exact, _ = tensorize(model, rank=10_000, allow_larger=True)
    assert isinstance(exact[0], MPOConv2d) and isinstance(exact[2], MPOConv2d)
    assert torch.allclose(exact(x), model(x), atol=1e-5)
    small, report = tensorize(model, ratio=3.0)
    assert report.compression_ratio >= 3.0 and {r.layer_type for r in report.layers} == {"MPOConv2d", "MPOLinear"}
    path = save_model(small, tmp_path / "cnn.safetensors")
    again = load_model(path, small_cnn())
    assert isinstance(again[2], MPOConv2d) and torch.equal(again(x), small(x))
