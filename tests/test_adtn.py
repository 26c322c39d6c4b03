"""ADTN weight generators against an explicit Kronecker-product construction, finite differences and files."""
import copy
import itertools

import pytest
import torch

import torchtn
from torchtn.core.adtn import (
    adtn_generate,
    adtn_live_params,
    adtn_num_params,
    brick_layer_pairs,
    num_qubits,
    plan_adtn,
)

f64 = torch.float64


def kronecker_reference(gates: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Every gate as the full 2^Q × 2^Q matrix I ⊗ G ⊗ I, applied in brick order to e_0."""
    depth, count = gates.shape[:2]
    Q = count + 1
    x = torch.zeros(2**Q, dtype=gates.dtype)
    x[0] = 1
    act = {"relu": torch.relu, "tanh": torch.tanh, "none": lambda t: t}[activation]
    for m in range(depth):
        if m:
            x = act(x)
        k = 0
        for half in brick_layer_pairs(Q):
            for q in half:
                full = torch.kron(torch.kron(torch.eye(2**q, dtype=gates.dtype), gates[m, k]),
                                  torch.eye(2 ** (Q - q - 2), dtype=gates.dtype))
                x = full @ x
                k += 1
    return x


@pytest.mark.parametrize("Q", [2, 3, 6, 9, 10])
@pytest.mark.parametrize("activation", ["relu", "tanh", "none"])
def test_engine_equals_the_kronecker_construction(Q, activation):
    gates = torch.randn(3, Q - 1, 4, 4, generator=torch.Generator().manual_seed(Q), dtype=f64) / 2
    ref = kronecker_reference(gates, activation)
    for group in (1, 2, 3):
        out = adtn_generate(gates, activation=activation, group=group)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(adtn_generate(gates, activation=activation, numel=37 if Q > 5 else 3,
                                             scale=2.5), 2.5 * ref[:37 if Q > 5 else 3], rtol=0, atol=1e-12)


def test_brick_layer_has_q_minus_one_gates_and_the_parameter_formula():
    for Q in range(2, 25):
        even, odd = brick_layer_pairs(Q)
        assert len(even) + len(odd) == Q - 1 and set(even).isdisjoint(odd)
    assert adtn_num_params(18, 2) == 16 * 2 * 17 + 1
    layer = torchtn.ADTNLinear(784, 256, depth=2)
    assert layer.Q == num_qubits(784 * 256) == 18
    assert layer.param_report == {"gates": 544, "scale": 1, "bias": 256, "generator": 545, "live": 437,
                                  "dense_weight": 200_704}
    assert sum(p.numel() for p in layer.parameters()) == 544 + 1 + 256
    assert torchtn.ADTNLinear(784, 256, depth=2, unitary=True).param_report["live"] == 545


def test_the_papers_424_is_one_brick_layer_at_q_21_and_24_counted_by_live_entries():
    """The report's account of the paper's count, computed: VGG-16's 512→4096 (Q = 21) and 4096→4096 (Q = 24) layers,
    one brick layer each, the first half-layer's gates at 4 entries; the live count drops 8 more at odd Q."""
    from torchtn.experiments.adtn import paper_gate_count

    assert num_qubits(512 * 4096) == 21 and num_qubits(4096 * 4096) == 24
    assert paper_gate_count(21) + paper_gate_count(24) == 424
    assert adtn_live_params(21, 1, scale=False) == paper_gate_count(21) - 8
    assert adtn_live_params(24, 1, scale=False) == paper_gate_count(24)


@pytest.mark.parametrize("Q,numel", [(2, 4), (3, 8), (3, 5), (6, 40), (7, 100), (18, 200_704)])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_live_parameters_are_the_gate_entries_with_a_gradient(Q, numel, depth):
    """adtn_live_params against autograd: for random gates (tanh between layers: no unit switched off, as a ReLU
    may), exactly the counted gate entries get a nonzero gradient — the others act on the fixed product start."""
    gates = torch.randn(depth, Q - 1, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(Q), requires_grad=True)
    out = adtn_generate(gates, numel=numel, activation="tanh")
    out.backward(torch.randn(out.shape, dtype=f64, generator=torch.Generator().manual_seed(1)))
    assert int((gates.grad != 0).sum()) == adtn_live_params(Q, depth, scale=False)
    first_half = len(brick_layer_pairs(Q)[0])  # stored first: only their first column acts on (1, 0)⊗(1, 0)
    assert not gates.grad[0, :first_half, :, 1:].any() and gates.grad[0, :first_half, :, 0].all()


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("Q,group", [(3, 2), (4, 1), (5, 1), (6, 2)])
def test_gradcheck(recompute, Q, group):
    """Finite differences, odd and even Q (the first half-layer on e_0 is a Kronecker product of the blocks' first
    columns, with a (1, 0) factor left over when Q is odd)."""
    gates = (torch.randn(2, Q - 1, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(Q)) / 2).requires_grad_()
    scale = torch.tensor(1.3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g, s: adtn_generate(g, activation="tanh", scale=s, group=group, recompute=recompute), (gates, scale))


def test_initial_weight_has_pytorchs_default_variance_up_to_q_24():
    for in_f, out_f in [(64, 10), (784, 256), (4096, 4096)]:
        torch.manual_seed(0)
        layer = torchtn.ADTNLinear(in_f, out_f, depth=1)
        assert layer.Q == num_qubits(in_f * out_f)
        with torch.no_grad():
            var = layer.weight.double().var().item()
        assert var == pytest.approx(1 / (3 * in_f), rel=1e-3)
    assert layer.Q == 24
    one = torchtn.ADTNLinear(1, 1, depth=1)  # one weight has no variance: its size is PyTorch's scale (it was NaN)
    assert one.weight.abs().item() == pytest.approx(3 ** -0.5, rel=1e-6)


def test_fitting_a_weight_improves_with_depth():
    target = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=f64)

    def fit(depth: int) -> float:
        torch.manual_seed(depth)
        layer = torchtn.ADTNLinear(16, 16, depth=depth, bias=False, activation="none").double()
        opt = torch.optim.Adam(layer.parameters(), lr=0.03)
        for _ in range(200):
            opt.zero_grad()
            loss = (layer.weight - target).square().mean()
            loss.backward()
            opt.step()
        return float(((layer.weight - target).norm() / target.norm()).detach())

    errors = [fit(d) for d in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_weight_is_cached_in_eval_and_regenerated_after_a_step():
    torch.manual_seed(0)
    layer = torchtn.ADTNLinear(20, 12, depth=2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # no regeneration between eval calls
    layer.train()
    layer(torch.randn(3, 20)).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        after = layer.weight
    assert after is not first and not torch.equal(after, first)
    torch.testing.assert_close(after, layer.generator._generate().detach())


def test_save_load_same_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchtn.ADTNLinear(30, 8, depth=3, activation="tanh"), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    x = torch.randn(4, 30)
    torchtn.save_model(model, tmp_path / "m.safetensors")
    skeleton = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    again = torchtn.load_model(tmp_path / "m.safetensors", skeleton)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    from torchtn.cli import main

    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    assert "ADTNLinear" in capsys.readouterr().out


def test_planner_merges_gates_and_bad_inputs_are_named():
    plan = plan_adtn(20, 2)
    assert plan.group in (1, 2, 3) and "gate(s) per pass" in str(plan)
    with pytest.raises(ValueError, match="expected \\(depth, Q - 1, 4, 4\\)"):
        adtn_generate(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="activation='gelu' is not allowed"):
        adtn_generate(torch.zeros(1, 3, 4, 4), activation="gelu")
    with pytest.raises(ValueError, match="group=5 is not allowed"):
        adtn_generate(torch.zeros(1, 3, 4, 4), group=5)
    with pytest.raises(ValueError, match="activation='gelu' is not allowed"):
        torchtn.ADTNLinear(4, 4, activation="gelu")


def test_from_dense_fits_a_trained_layer_and_reports_the_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():  # a weight an ADTN can represent: generated by another one
        linear.weight.copy_(torchtn.ADTNLinear(16, 8, depth=2, activation="none").weight)
    layer, error = torchtn.ADTNLinear.from_dense(linear, depth=2, activation="none", steps=400)
    _, untrained = torchtn.ADTNLinear.from_dense(linear, depth=2, activation="none", steps=1)
    assert error < 0.5 * untrained and error == pytest.approx(
        float((layer.weight - linear.weight).norm().detach() / linear.weight.norm().detach()), rel=1e-5)
    torch.testing.assert_close(layer.bias, linear.bias)
    # the fit's own gradients stay behind: a loop that zeroes gradients after its step would take them as the first
    assert all(p.grad is None for p in layer.parameters())
    layer.generator.gates.grad = torch.ones_like(layer.generator.gates)
    layer.generator.fit(linear.weight, steps=2)
    assert torch.equal(layer.generator.gates.grad, torch.ones_like(layer.generator.gates))


def test_conv2d_is_f_conv2d_with_the_generated_kernel_and_has_conv_init_variance():
    torch.manual_seed(0)
    conv = torchtn.ADTNConv2d(6, 8, 3, stride=2, padding=1, dilation=2, groups=2, depth=2).double()
    x = torch.randn(2, 6, 11, 9, dtype=f64)
    kernel = conv.weight
    assert kernel.shape == (8, 3, 3, 3)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, kernel, conv.bias, 2, 1, 2, 2),
                               rtol=0, atol=1e-12)
    big = torchtn.ADTNConv2d(64, 64, 3, depth=1)
    with torch.no_grad():
        assert big.weight.double().var().item() == pytest.approx(1 / (3 * 64 * 9), rel=1e-3)
    assert big.param_report["dense_weight"] == 64 * 64 * 9


def test_any_parameter_can_be_generated_by_an_adtn():
    from torch.nn.utils import parametrize

    from torchtn.layers import adtn_parametrize

    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 16)
    gen = adtn_parametrize(emb, "weight", depth=2)
    assert parametrize.is_parametrized(emb, "weight") and emb.weight.shape == (100, 16)
    trainable = sum(p.numel() for p in emb.parameters() if p.requires_grad)
    assert trainable == gen.num_params == 16 * 2 * (11 - 1) + 1  # the dense table is gone (an empty original)
    ids = torch.tensor([[1, 5, 7]])
    emb(ids).sum().backward()
    assert gen.gates.grad is not None and gen.gates.grad.abs().sum() > 0
    torch.testing.assert_close(emb(ids)[0, 1], gen()[5])


class _Mixed(torch.nn.Module):
    """Every kind of layer tensorize meets, some held by PyTorch's own parametrizations."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils import parametrizations

        self.emb = torch.nn.Embedding(100, 64)
        self.att = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        parametrizations.orthogonal(self.att.out_proj, "weight")
        self.fc = parametrizations.weight_norm(torch.nn.Linear(64, 64))
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.head = torch.nn.Linear(64, 10)


@pytest.mark.parametrize("method", ["mpo", "adtn"])
def test_tensorize_reports_every_layer_it_leaves_and_counts_what_parametrized_layers_hold(method):
    torch.manual_seed(0)
    model = _Mixed()
    kwargs = {"rank": 4} if method == "mpo" else {"fit_steps": 0}
    new, report = torchtn.tensorize(model, method=method, **kwargs)
    rows = {r.name: r for r in report.layers}
    # a weight-normed nn.Linear is converted, and what it held (g, v and the bias) is what the report counts
    assert type(new.fc).__name__ == ("MPOLinear" if method == "mpo" else "ADTNLinear")
    assert rows["fc"].params_before == sum(p.numel() for p in model.fc.parameters()) == 64 * 64 + 64 + 64
    # the orthogonal out_proj is left to its parametrization, and the report says so
    assert "att.out_proj.weight (held by _Orthogonal already)" in report.skipped
    assert torch.equal(new.att.out_proj.weight, model.att.out_proj.weight)
    if method == "adtn":  # what ADTNs cannot hold is named with the reason
        assert "emb (nn.Embedding: ADTNs hold Linear and Conv2d weights)" in report.skipped
        assert any(s.startswith("conv (padding_mode='reflect'") for s in report.skipped)
        assert type(new.emb) is torch.nn.Embedding and type(new.conv) is torch.nn.Conv2d
    # rows follow the model's own order, attention tensors at their module's place
    order = ["emb", "att.in_proj_weight", "fc", "conv", "head"]
    assert [r.name for r in report.layers] == [n for n in order if n in rows]
    assert report.params_after == sum(p.numel() for p in new.parameters())


def test_tensorize_with_adtn_fits_every_layer_and_reports_the_fit_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    # never bigger: the conv's 216 weights would take 16·2·7 + 1 = 225 generator parameters at depth 2
    kept, report = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=0, skip=["5"])
    assert type(kept[0]) is torch.nn.Conv2d and sorted(report.skipped) == ["0", "5"]
    assert [r.name for r in report.layers] == ["3"] and "not converted: 5, 0" in str(report)
    new, report = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=60, skip=["5"], allow_larger=True)
    assert report.skipped == ["5"]
    assert [type(new[i]).__name__ for i in (0, 3, 5)] == ["ADTNConv2d", "ADTNLinear", "Linear"]
    x = torch.randn(2, 3, 6, 6)
    assert new(x).shape == (2, 4)
    rows = {r.name: r for r in report.layers}
    for name in ("0", "3"):
        layer, dense = new[int(name)], model[int(name)]
        err = float((layer.weight - dense.weight).norm().detach() / dense.weight.norm().detach())
        assert rows[name].rel_error == pytest.approx(err, rel=1e-5) and rows[name].rel_error < 1.0
        assert rows[name].weight_ratio == pytest.approx(dense.weight.numel() / layer.generator.num_params)
        torch.testing.assert_close(layer.bias, dense.bias)
    assert report.params_after == sum(p.numel() for p in new.parameters()) < report.params_before
    assert all(p.grad is None for p in new.parameters())
    assert "ADTNConv2d" in str(report)
    with pytest.raises(ValueError, match="method='adtn' takes depth"):
        torchtn.tensorize(model, method="adtn", rank=4)
    with pytest.raises(ValueError, match="method='tucker' is not allowed"):
        torchtn.tensorize(model, method="tucker", rank=4)


@pytest.mark.parametrize("Q", [5, 9, 12])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "none"])
def test_recomputing_backward_equals_autograd_through_every_pass(Q, group, activation):
    """The hand-written backward (scratch buffers, recomputed passes; every branch of the block-gradient reduction
    is reached across these Q and groups) against autograd through the stored passes."""
    from torchtn.core.adtn import _passes

    branches = set()
    for first, span, _ in _passes(Q, group):
        rest, a = 2 ** (Q - first - span), 2**span
        branches.add("gemm" if rest == 1 else "one" if first == 0 else "bmm" if 2**first * a * a <= 2**Q else "perm")
    gates = torch.randn(3, Q - 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(Q)) / 2
    weights = torch.randn(2**Q, dtype=torch.float64)
    grads = []
    for recompute in (False, True):
        g = gates.clone().requires_grad_()
        out = adtn_generate(g, activation=activation, group=group, recompute=recompute)
        (out * weights).sum().backward()
        grads.append((out.detach(), g.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-11), branches
    if (Q, group) == (12, 2):  # this case reaches every branch
        assert branches == {"gemm", "one", "bmm", "perm"}


def test_unitary_gates_are_orthogonal_and_keep_the_norm(tmp_path):
    """unitary=True: every gate is the orthogonal polar factor of its latent, so without activations the generated
    2^Q vector is e_0 rotated — its norm is exactly |scale|; gradients reach the latents; files keep the option."""
    from torchtn.core.adtn import orthogonal_gates
    from torchtn.layers import ADTNGenerator

    torch.manual_seed(0)
    g = ADTNGenerator((2 ** 7,), depth=3, activation="none", unitary=True, dtype=torch.float64)
    gates = g.effective_gates
    eye = torch.eye(4, dtype=torch.float64).expand_as(gates)
    torch.testing.assert_close(gates @ gates.mT, eye, rtol=0, atol=1e-12)
    # the polar factor is the orthogonal matrix nearest the latent: no random orthogonal matrix is nearer
    latent = g.gates.detach()[0, 0]
    best = torch.linalg.matrix_norm(latent - gates[0, 0].detach())
    for _ in range(50):
        q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
        assert torch.linalg.matrix_norm(latent - q) >= best - 1e-12
    assert g().norm().item() == pytest.approx(abs(g.scale.item()), rel=1e-12)
    assert torch.autograd.gradcheck(lambda lat: orthogonal_gates(lat), (torch.randn(2, 4, 4, dtype=torch.float64,
                                                                                   requires_grad=True),))

    layer = torchtn.ADTNLinear(20, 12, depth=2, unitary=True, dtype=torch.float64)
    with torch.no_grad():
        assert layer.weight.var().item() == pytest.approx(1 / (3 * 20), rel=1e-6)  # PyTorch's variance at step 0
    x = torch.randn(3, 20, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert layer.generator.gates.grad.abs().sum() > 0
    assert layer.layout()["unitary"] is True and "unitary=True" in repr(layer.generator)
    path = torchtn.save_model(torch.nn.Sequential(layer), tmp_path / "u.safetensors")
    back = torchtn.load_model(path, torch.nn.Sequential(torch.nn.Linear(20, 12, dtype=torch.float64)))
    assert back[0].generator.unitary and torch.equal(back(x), layer(x))


def test_fresh_adtns_by_tensorize_and_the_callers_rng_left_alone():
    """fit_steps=0: every layer becomes a fresh ADTN at PyTorch's variance (to train from scratch), with the unitary
    option passed through; fitting seeds its own RNG and leaves the caller's untouched; reset_parameters redraws."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    state = torch.get_rng_state()
    new, report = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=0, unitary=True)
    assert torch.equal(torch.get_rng_state(), state)  # from_dense drew from its own seeded RNG
    attention = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2))
    state = torch.get_rng_state()
    torchtn.tensorize(attention, method="adtn", depth=1, fit_steps=0)
    assert torch.equal(torch.get_rng_state(), state)  # so did the attention's parametrizations
    layer = new[0]
    assert type(layer).__name__ == "ADTNLinear" and layer.generator.unitary
    with torch.no_grad():
        assert layer.weight.var().item() == pytest.approx(1 / (3 * 40), rel=1e-4)
        before = layer.weight.clone()
    assert report.layers[0].rel_error > 0.5  # unfitted: far from the dense weight
    layer.generator.reset_parameters()
    with torch.no_grad():
        assert not torch.equal(layer.weight, before)
        assert layer.weight.var().item() == pytest.approx(1 / (3 * 40), rel=1e-4)
    with pytest.raises(ValueError, match="unitary=True is for method='adtn'"):
        torchtn.tensorize(model, rank=2, unitary=True)


def test_inspect_states_what_an_adtn_counts(tmp_path, capsys):
    from torchtn.cli import main
    from torchtn.layers import adtn_parametrize

    model = torch.nn.Sequential(torchtn.ADTNLinear(784, 256, 2), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    adtn_parametrize(model[2], "weight", depth=1)
    path = torchtn.save_model(model, tmp_path / "adtn.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    # 16·2·17 gates, Q = 18; live: the first half-layer's 9 gates act on (1, 0)⊗(1, 0), 4 entries each
    assert ("544 gates + 1 scale + 256 bias (for 200,704 dense weights; 437 of the generator's 545 can change the "
            "weight)") in out
    assert "176 gates + 1 scale (for 2,560 dense weights; 105 of the generator's 177" in out  # 16·1·11, Q = 12


def test_an_adtn_too_big_for_the_memory_is_refused_before_generating(monkeypatch):
    """ADTNLinear(65536, 65536) is a 2^32-entry weight: generating it takes 3 × 16 GiB; on a machine with less the
    constructor says so (a MemoryError naming the shape and both sizes) instead of being killed by the kernel. Here
    the free memory is made small, so the test allocates nothing big on any machine."""
    from torchtn import _checks

    monkeypatch.setattr(_checks, "MEMORY_CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(_checks, "available_memory", lambda device: 10 << 20)  # 10 MiB free
    with pytest.raises(MemoryError, match=r"ADTN of shape \(1024, 1024\) \(2\^20 = 1,048,576 entries\) needs about "
                                          r"12\.0 MiB on cpu, which has 10\.0 MiB available"):
        torchtn.ADTNLinear(1024, 1024)
    assert torchtn.ADTNLinear(256, 256).weight.shape == (256, 256)  # 3 × 2^16 × 4 B = 768 KiB fits
    assert torchtn.ADTNLinear(1024, 1024, device="meta").weight.shape == (1024, 1024)  # nothing generated there


def test_pruned_gates_are_what_the_layer_computes_with_and_its_weight_names_what_to_prune():
    """torch.nn.utils.prune on the generator's gates works (the generator is called, so its pruning hook runs); on
    the computed weight itself it is refused with the parameters to prune instead (was PyTorch's TypeError about a
    'weight_orig' parameter)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer, x = torchtn.ADTNLinear(12, 6, depth=2, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    prune.l1_unstructured(layer.generator, "gates", amount=0.3)
    with torch.no_grad():
        plain.generator.gates.mul_(layer.generator.get_buffer("gates_mask"))
    for training in (True, False):
        layer.train(training)
        plain.train(training)
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"ADTNLinear.weight cannot be pruned.*generator.gates"):
        prune.l1_unstructured(torchtn.ADTNLinear(12, 6), "weight", amount=0.3)


@pytest.mark.parametrize("mapping", ["axes", "interleaved"])
def test_mappings_place_every_entry_at_the_qubits_of_its_axes_bits(mapping):
    """``adtn_reshape`` against index arithmetic: entry ``(i₀, i₁, …)`` is the vector's entry whose chain bits are the
    axes' bits in the mapping's order (axes: axis after axis; interleaved: the axes in turn), most significant first;
    padding entries are never read. ``rowmajor`` is the first ``numel`` entries."""
    from torchtn.core.adtn import adtn_qubits, adtn_reshape

    shape, bits = (3, 5, 2, 1), [2, 3, 1, 0]
    Q = adtn_qubits(shape, mapping)
    assert Q == 6 and adtn_qubits(shape) == num_qubits(30) == 5
    vector = torch.arange(2 ** Q, dtype=torch.float64)
    order = ([(a, b) for a, n in enumerate(bits) for b in reversed(range(n))] if mapping == "axes" else
             [(0, 1), (1, 2), (2, 0), (0, 0), (1, 1), (1, 0)])
    t = adtn_reshape(vector, shape, mapping)
    assert t.shape == shape
    for idx in itertools.product(*[range(d) for d in shape]):
        position = 0
        for a, b in order:
            position = 2 * position + ((idx[a] >> b) & 1)
        assert t[idx] == position, idx
    torch.testing.assert_close(adtn_reshape(vector, shape), vector[:30].reshape(shape), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mapping='columns' is not allowed"):
        adtn_qubits(shape, "columns")


@pytest.mark.parametrize("mapping", ["axes", "interleaved"])
def test_a_layer_with_another_mapping_generates_its_weight_so_and_files_keep_it(tmp_path, mapping):
    from torchtn.core.adtn import adtn_reshape

    torch.manual_seed(0)
    layer = torchtn.ADTNLinear(20, 12, depth=2, mapping=mapping, dtype=torch.float64)
    g = layer.generator
    assert g.Q == 5 + 4 and f"mapping='{mapping}'" in repr(layer)
    expected = adtn_reshape(adtn_generate(g.gates, activation=g.activation, scale=g.scale), (12, 20), mapping)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
    assert abs(float(layer.weight.detach().std()) - (1 / (3 * 20)) ** 0.5) < 1e-9  # PyTorch's variance at any mapping
    x = torch.randn(4, 20, dtype=torch.float64)
    path = torchtn.save_model(torch.nn.Sequential(layer), tmp_path / "m.safetensors")
    back = torchtn.load_model(path, torch.nn.Sequential(torch.nn.Linear(20, 12, dtype=torch.float64)))
    assert back[0].generator.mapping == mapping
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    conv = torchtn.ADTNConv2d(3, 4, 3, mapping=mapping)
    assert conv.Q == 2 + 2 + 2 + 2 and conv.weight.shape == (4, 3, 3, 3)
    with pytest.raises(ValueError, match="mapping='rows'"):
        torchtn.ADTNLinear(20, 12, mapping="rows")


def test_tensorize_with_adtn_takes_the_mapping_and_counts_its_qubits():
    """``mapping`` reaches every generator tensorize makes (fitted, or in an attention's parametrization), and the
    never-bigger rule counts that mapping's qubits: 17×17 is 9 qubits row-major (2·8 gates + scale = 257 < 289
    weights) but 5 + 5 = 10 by axes (289 parameters: no smaller, so the layer stays dense)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 20), torch.nn.ReLU(), torch.nn.Linear(20, 17),
                                torch.nn.Linear(17, 17))
    new, report = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=30, mapping="axes")
    assert isinstance(new[0], torchtn.ADTNLinear) and new[0].generator.mapping == "axes"
    assert new[0].generator.gates.shape == (2, 6 + 5 - 1, 4, 4)  # 33 → 64 (6 qubits), 20 → 32 (5)
    assert type(new[3]) is torch.nn.Linear and "3" in report.skipped
    row = next(r for r in report.layers if r.name == "0")
    err = float((new[0].weight - model[0].weight).norm().detach() / model[0].weight.norm().detach())
    assert row.rel_error == pytest.approx(err, rel=1e-5)
    rowmajor, _ = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=0)
    assert isinstance(rowmajor[3], torchtn.ADTNLinear) and rowmajor[3].Q == 9
    attention, _ = torchtn.tensorize(torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2)), method="adtn",
                                     depth=1, fit_steps=0, mapping="interleaved")
    generator = attention[0].parametrizations.in_proj_weight[0].generator
    assert generator.mapping == "interleaved" and generator.shape == (48, 16)
    with pytest.raises(ValueError, match="mapping='axes' is for method='adtn'"):
        torchtn.tensorize(model, rank=2, mapping="axes")
    with pytest.raises(ValueError, match="mapping='diagonal' is not allowed"):
        torchtn.tensorize(model, method="adtn", mapping="diagonal")
