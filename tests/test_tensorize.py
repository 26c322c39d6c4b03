"""tensorize: copies, exactness, error bounds, global budgets, skip rules, reports."""
import json

import pytest
import torch
from torch import nn

from torchtn import MPOConv2d, MPOLinear, tensorize
from torchtn.compress import allocate_ranks


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)


def test_returns_a_copy_and_full_rank_is_exact():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = tensorize(model, rank=10_000, allow_larger=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(isinstance(new[i], MPOLinear) for i in (0, 2, 4)) and isinstance(model[0], nn.Linear)
    x = torch.randn(6, 784, dtype=torch.float64)
    assert torch.allclose(new(x), model(x), atol=1e-9)
    assert max(r.rel_error for r in report.layers) < 1e-12


def test_rel_tol_bound_per_layer_and_report_table():
    model = mlp()
    new, report = tensorize(model, rel_tol=0.4, allow_larger=True)  # random weights: flat spectra
    for row, idx in zip(report.layers, (0, 2, 4)):
        w, w_tt = model[idx].weight.detach(), new[idx].to_dense().detach()
        assert torch.linalg.norm(w_tt - w) / torch.linalg.norm(w) <= 0.4 + 1e-9
        assert row.rel_error == pytest.approx(float(torch.linalg.norm(w_tt - w) / torch.linalg.norm(w)), rel=1e-6)
    text = str(report)
    assert "256×784" in text and "rel. error" in text and "dense / tensorized" in text
    assert report.params_after == sum(p.numel() for p in new.parameters())


@pytest.mark.parametrize("ratio", [5.0, 50.0, 200.0])
def test_ratio_reaches_the_budget(ratio):
    model = mlp(torch.float32)
    new, report = tensorize(model, ratio=ratio)
    dense = sum(p.numel() for p in model.parameters())
    tensorized = sum(p.numel() for p in new.parameters())
    assert dense / tensorized >= ratio
    assert dense / tensorized < ratio * 1.03  # the budget is used up to the granularity of one rank step
    assert report.compression_ratio == pytest.approx(dense / tensorized)


def test_ratio_shares_budget_by_spectra():
    torch.manual_seed(0)
    low = nn.Linear(64, 64)
    with torch.no_grad():  # layer 0: exactly TT-rank 2 across every bond, so a small budget suffices for it
        low.weight.copy_(MPOLinear(64, 64, 2, bias=False).to_dense() * 10)
    model = nn.Sequential(low, nn.Linear(64, 64))
    _, report = tensorize(model, ratio=3.0)
    assert report.layers[0].rel_error < 1e-5  # the budget kept layer 0's two singular values per bond ...
    assert sum(report.layers[1].ranks) > sum(report.layers[0].ranks) + 4  # ... and went to layer 1's flat spectrum


def test_allocate_ranks_respects_budget():
    spectra = [[torch.tensor([3.0, 2.0, 1.0])], [torch.tensor([5.0, 0.1])]]
    shapes = [((4, 4), (4, 4)), ((2, 2), (2, 2))]
    # start: 96 + 16 entries. Cheapest per entry saved: layer 1's 0.1 (0.01/8), then layer 0's 1.0 (1/32) — which
    # leaves 72 of 80 entries used; the slack of 8 then buys layer 1's 0.1 back.
    assert allocate_ranks(spectra, shapes, budget=80) == [[2], [2]]
    assert allocate_ranks(spectra, shapes, budget=79) == [[2], [1]]
    assert allocate_ranks(spectra, shapes, budget=104) == [[3], [1]]
    assert allocate_ranks(spectra, shapes, budget=40) == [[1], [1]]
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(spectra, shapes, budget=10)


def test_skip_patterns_and_multihead_attention_parametrized_in_place():
    from torch.nn.utils import parametrize

    model = mlp()
    new, report = tensorize(model, rank=2, skip=["4"])
    assert isinstance(new[4], nn.Linear) and report.skipped == ["4"]
    attn = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    block = nn.ModuleDict({"attn": attn, "head": nn.Linear(16, 4)})
    new_block, rep = tensorize(block, rank=2)
    # the attention reads out_proj.weight directly: out_proj stays an nn.Linear whose weight is an MPO
    out_proj = new_block["attn"][0].out_proj
    assert type(out_proj).__name__ == "ParametrizedNonDynamicallyQuantizableLinear"
    assert parametrize.is_parametrized(out_proj, "weight") and isinstance(new_block["head"], MPOLinear)
    assert {r.name for r in rep.layers} == {"attn.0.in_proj_weight", "attn.0.out_proj.weight", "head"}
    assert not rep.skipped
    _, rep = tensorize(block, rank=2, skip="attn.0.in_proj_weight")  # a tensor the attention holds, by its name
    assert rep.skipped == ["attn.0.in_proj_weight"]


def test_custom_shapes():
    new, report = tensorize(mlp(), rank=3, shapes={"0": ((28, 28), (16, 16))})
    assert new[0].in_shape == (28, 28) and report.layers[0].in_shape == (28, 28)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "rank=, rel_tol= or ratio="),
    (dict(ratio=0), "ratio=0"),
    (dict(ratio=-2.0), "ratio=-2.0"),
    (dict(ratio=0.5), r"ratio=0.5 is not allowed: expected a compression ratio > 1"),  # (a bigger model: ran)
    (dict(ratio=1), r"ratio=1 is not allowed"),
    (dict(ratio=5, rank=2), "either ratio"),
    (dict(rank=0), "rank=0"),
    (dict(rel_tol=1.0), "rel_tol=1.0"),
    (dict(ratio=1e9), "unreachable"),
    (dict(rank=2, shapes={"nope": ((2,), (2,))}), "nope"),
    (dict(rank=2, skip=["4", "classifer*"]), r"skip pattern 'classifer\*' matches no module or parameter .* "
                                              r"top-level modules: 0, 1, 2, 3, 4"),
    (dict(method="adtn", skip="fc9"), "skip pattern 'fc9' matches no module"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tensorize(mlp(torch.float32), **kwargs)


def test_a_layer_with_non_finite_weights_is_named():
    model = mlp(torch.float32)
    with torch.no_grad():
        model[2].weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layer '2' holds NaN or infinite weights"):
        tensorize(model, rank=2)
    with pytest.raises(ValueError, match=r"layer '2' holds NaN or infinite weights"):
        tensorize(model, ratio=3)
    with pytest.raises(ValueError, match=r"layer '2' holds NaN .*fitting an ADTN needs finite entries"):
        tensorize(model, method="adtn", fit_steps=5)
    assert tensorize(model, method="adtn", fit_steps=0)[1].layers  # fresh ADTNs read no weight


@pytest.mark.parametrize("method", ["mpo", "adtn"])
def test_a_layer_without_values_is_named(method):
    """A lazy layer before its first forward pass, or one on the meta device, has no weights to decompose (before:
    'n=0 is not allowed' from deep inside, or 'Tensor.item() cannot be called on meta tensors')."""
    kw = dict(rank=2) if method == "mpo" else dict(method="adtn", depth=1)
    with pytest.raises(ValueError, match=r"layer '1' \(LazyLinear\) is not initialized yet .*run one forward pass"):
        tensorize(nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4)), **kw)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) is on the meta device"):
        tensorize(nn.Sequential(nn.Linear(64, 32, device="meta")), **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_tensorized_in_float32_and_keeps_its_dtype(dtype):
    """No half-precision QR or SVD kernels: TT-SVD, rounding and the spectra run in float32, the cores come back in
    the model's dtype (before: NotImplementedError "geqrf_cpu" not implemented for 'BFloat16')."""
    model = mlp(torch.float32)
    half = mlp(torch.float32).to(dtype)
    for ratio in (None, 4.0):
        kw = dict(ratio=ratio) if ratio else dict(rank=8)
        new, report = tensorize(half, **kw)
        ref, ref_report = tensorize(model, **kw)
        assert all(c.dtype == dtype for m in new.modules() if isinstance(m, MPOLinear) for c in m.cores)
        assert [r.ranks for r in report.layers] == [r.ranks for r in ref_report.layers]
        for a, b in zip(report.layers, ref_report.layers):  # the errors of the float32 model's, to half precision
            assert a.rel_error == pytest.approx(b.rel_error, abs=0.02)
    layer = new[0]
    assert layer.entanglement_entropy().shape == (len(layer.cores) - 1,)
    assert layer.tt.round(max_rank=2).cores[0].dtype == dtype


def test_model_without_linear_layers():
    with pytest.raises(ValueError, match="no layer that tensorize can convert"):
        tensorize(nn.Sequential(nn.ReLU()), rank=2)
    with pytest.raises(TypeError, match="nn.Module"):
        tensorize("model", rank=2)


def test_ratio_within_one_percent_on_a_real_sized_cnn():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))
    dense = sum(p.numel() for p in cnn.parameters())
    for ratio in (3.0, 10.0, 30.0):
        new, report = tensorize(cnn, ratio=ratio)
        got = dense / sum(p.numel() for p in new.parameters())
        assert ratio <= got <= ratio * 1.01, (ratio, got)
        assert all(r.params_after < r.params_before for r in report.layers)
        if ratio >= 10:
            assert isinstance(new[2], MPOConv2d)
        assert isinstance(new[0], nn.Conv2d)  # 3 → 64 channels, 27 weights per filter: its MPO would not be smaller


def test_a_layer_whose_mpo_would_be_larger_stays_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 6))
    new, report = tensorize(model, rank=8)  # 8 → 6 as an MPO: 64 core entries for 48 weights
    assert isinstance(new[0], MPOLinear) and isinstance(new[4], nn.Linear)
    assert "4 (its MPO would not be smaller)" in report.skipped and "would not be smaller" in str(report)
    assert all(r.params_after < r.params_before for r in report.layers)
    squeezed, rep2 = tensorize(model, ratio=20)  # the budget then goes to the layers that do compress
    assert rep2.compression_ratio >= 20 and all(r.params_after < r.params_before for r in rep2.layers)


def test_a_models_torchtn_layers_are_compressed_anew():
    """A model that holds torchtn layers already is compressed further from the maps they compute: an MPOLinear at
    its own modes (a smaller rank is the TT-SVD of its own matrix there), never into something bigger than it was
    (then it stays as it was), within a whole-model ratio counted from what the model holds now; ADTN layers and
    attention projections held as MPOs are converted too."""
    from torchtn import ADTNLinear, TTMatrix

    torch.manual_seed(0)
    first = MPOLinear.from_dense(nn.Linear(64, 48, dtype=torch.float64), rank=8, in_shape=(4, 4, 4),
                                 out_shape=(3, 4, 4))
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(48, 10, dtype=torch.float64))
    W = first.weight.detach()
    smaller, report = tensorize(model, rank=4, skip=["2"])
    assert smaller[0].in_shape == (4, 4, 4) and smaller[0].out_shape == (3, 4, 4)
    own = TTMatrix.from_dense(W, (4, 4, 4), (3, 4, 4), max_rank=4)
    torch.testing.assert_close(smaller[0].weight, own.to_dense(), rtol=0, atol=1e-12)
    torch.testing.assert_close(smaller[0].bias, first.bias, rtol=0, atol=0)
    row = report.layers[0]
    assert row.params_before == sum(p.numel() for p in first.parameters()) > row.params_after
    assert row.rel_error == pytest.approx(float(torch.linalg.matrix_norm(own.to_dense() - W) /
                                                torch.linalg.matrix_norm(W)))
    assert isinstance(model[0], MPOLinear) and model[0].ranks == (1, 8, 8, 1)  # the input is left alone

    same, report = tensorize(model, rank=16, skip=["2"])  # no smaller MPO: the layer stays as it was
    assert isinstance(same[0], MPOLinear) and torch.equal(same[0].weight, first.weight)
    assert "0 (as it was: its new MPO would not be smaller)" in report.skipped

    before = sum(p.numel() for p in model.parameters())
    halved, report = tensorize(model, ratio=2)
    assert report.params_before == before and sum(p.numel() for p in halved.parameters()) <= before / 2

    adtn = nn.Sequential(ADTNLinear(64, 48, depth=2, dtype=torch.float64))
    as_mpo, report = tensorize(adtn, rel_tol=1e-12, allow_larger=True)
    x = torch.randn(3, 64, dtype=torch.float64)
    assert isinstance(as_mpo[0], MPOLinear)
    torch.testing.assert_close(as_mpo(x), adtn(x), rtol=0, atol=1e-10)

    attention = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64))
    once, _ = tensorize(attention, rank=4)
    twice, report = tensorize(once, rank=2)
    assert sorted(r.name for r in report.layers) == ["0.in_proj_weight", "0.out_proj.weight"]
    assert all(r.ranks and max(r.ranks) <= 2 for r in report.layers)
    assert max(once[0].parametrizations.in_proj_weight[0].ranks) == 4  # the input is left alone, and still runs
    q = torch.randn(2, 3, 16, dtype=torch.float64)  # (a deep copy shares the class PyTorch made for a parametrized
    assert once[0](q, q, q)[0].shape == (2, 3, 16)  # module: removing one from the copy had broken the original)
    kept, report = tensorize(once, rank=2, skip=["0.in_proj_weight"])  # a skipped tensor stays as it was
    assert [r.name for r in report.layers] == ["0.out_proj.weight"]
    assert max(kept[0].parametrizations.in_proj_weight[0].ranks) == 4
    assert report.skipped == ["0.in_proj_weight (held by MPOParametrization already)"]  # and the report says so


class _TiedLM(nn.Module):
    """A language model whose output head shares the input table's weight (tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.parametrize("kw", [dict(rank=4), dict(ratio=1.2), dict(method="adtn", depth=1, fit_steps=0)])
def test_modules_sharing_a_weight_stay_dense_and_stay_tied(kw):
    """Converted one by one, a tied table and head became two independent MPOs (the tie silently gone, and an
    embedding-only conversion would leave the head holding the whole dense table)."""
    torch.manual_seed(0)
    new, report = tensorize(_TiedLM(), **kw)
    assert type(new.emb) is nn.Embedding and type(new.head) is nn.Linear and new.head.weight is new.emb.weight
    assert type(new.mid) is not nn.Linear  # the untied layer is converted
    tied = [s for s in report.skipped if "(tied)" in s]
    assert any(s.startswith("head (its weight is emb's too (tied): an MPO would untie them") for s in tied)
    assert any(s.startswith("emb (its weight is head's too (tied)") for s in tied) or "method" in kw  # (ADTNs: no
    # tables at all)
    with pytest.raises(ValueError, match="ratio=2 is unreachable: the 3,232 parameters that stay dense"):
        tensorize(_TiedLM(), ratio=2)  # only the untied layer can shrink


@pytest.mark.parametrize("make,x", [
    (lambda: nn.Linear(48, 40, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64), torch.randn(2, 8, 6, 6, dtype=torch.float64)),
    (lambda: nn.Embedding(60, 16, dtype=torch.float64), torch.tensor([[0, 5, 59]])),
])
def test_a_model_that_is_one_layer_comes_back_as_the_torchtn_layer(make, x):
    """tensorize(nn.Linear(...)) — the model is itself the layer — returns the torchtn layer (it used to register the
    MPO as a child named "" of a copy of the dense layer and return that, computing as before, its report claiming
    a conversion and counting both); the layer given is untouched; the report names it "(model)"."""
    torch.manual_seed(0)
    dense = make()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    layer, report = tensorize(dense, rank=64, allow_larger=True)  # full rank: exact
    assert type(layer).__name__ == "MPO" + type(dense).__name__ and not list(dense.children())
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-9, atol=1e-9)
    assert report.params_after == sum(p.numel() for p in layer.parameters())
    assert str(report).splitlines()[2].startswith("(model)")
    smaller, report = tensorize(layer, rank=2)  # a torchtn layer as the model: compressed anew, from its own map
    assert type(smaller) is type(layer) and max(smaller.ranks) == 2
    assert report.params_after == sum(p.numel() for p in smaller.parameters()) < report.params_before


def test_a_one_layer_model_kept_as_it_was_and_the_adtn_method():
    torch.manual_seed(0)
    mpo = MPOLinear(48, 40, 2, dtype=torch.float64)
    same, report = tensorize(mpo, rank=32)  # its new MPO would not be smaller: the layer as it was
    assert same is not mpo and torch.equal(same.to_dense(), mpo.to_dense())
    assert "not converted: (model) (as it was" in str(report)
    adtn, report = tensorize(nn.Linear(256, 64), method="adtn", fit_steps=0)
    assert type(adtn).__name__ == "ADTNLinear" and report.params_after == sum(p.numel() for p in adtn.parameters())


def test_a_compiled_model_is_saved_loaded_summarized_and_tensorized_as_the_model_it_wraps(tmp_path):
    """torch.compile wraps a model in an OptimizedModule whose state_dict names every tensor `_orig_mod.…`: its file
    named the MPO layer `_orig_mod.0` (class OptimizedModule) and could not be loaded into the plain model. Files,
    summaries and tensorize now see the model it wraps; a compiled skeleton takes a file too."""
    from torchtn import load_model, save_model, summary

    def dense():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear(64, 32, 4), nn.ReLU(), nn.Linear(32, 10))
    compiled = torch.compile(model, backend="eager")
    path = save_model(compiled, tmp_path / "m.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert list(meta["layers"]) == ["0"] and meta["model_class"] == "Sequential"
    x = torch.randn(3, 64)
    plain = load_model(path, dense())
    torch.testing.assert_close(plain(x), model(x))
    skeleton = torch.compile(dense(), backend="eager")
    assert load_model(path, skeleton) is skeleton and isinstance(skeleton._orig_mod[0], MPOLinear)
    torch.testing.assert_close(skeleton(x), model(x))
    assert summary(compiled).splitlines()[0] == summary(model).splitlines()[0] == "Sequential with 778 parameters"
    converted, report = tensorize(torch.compile(dense(), backend="eager"), rank=2)
    assert type(converted) is nn.Sequential and isinstance(converted[0], MPOLinear)
    assert [r.name for r in report.layers] == ["0", "2"]
    from torchtn import calibrate

    trained = torch.compile(dense(), backend="eager")  # calibrated by its layers' own names, as tensorize sees them
    stats = calibrate(trained, [torch.randn(16, 64) for _ in range(3)])
    assert sorted(stats) == ["0", "2"]
    assert isinstance(tensorize(trained, ratio=1.5, calibration=stats)[0][0], MPOLinear)


@pytest.mark.parametrize("method", ["mpo", "adtn"])
def test_frozen_layers_stay_frozen_through_tensorize_and_back(method):
    """A layer frozen for fine-tuning (requires_grad=False) came back from tensorize trainable: its cores, gates and
    bias all required gradients, so healing trained what the user had frozen. Each converted layer now keeps the
    frozen parts of the one it replaces (weight → cores / gates / exact rows, bias → bias), also for an attention's
    projections, for a torchtn layer compressed anew, and back through densify."""
    from torchtn.layers import densify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.Conv2d(4, 8, 3))
    model[0].requires_grad_(False)  # all frozen
    model[2].bias.requires_grad_(False)  # only the bias
    model[3].weight.requires_grad_(False)  # only the weight
    kw = {"rank": 4} if method == "mpo" else {"fit_steps": 2, "method": "adtn"}
    new, _ = tensorize(model, **kw)

    def trainable(m):
        return {n: p.requires_grad for n, p in m.named_parameters()}

    flags = trainable(new)
    assert not any(v for n, v in flags.items() if n.startswith("0."))
    assert not flags["2.bias"] and all(v for n, v in flags.items() if n.startswith("2.") and n != "2.bias")
    assert flags["3.bias"] and not any(v for n, v in flags.items() if n.startswith("3.") and n != "3.bias")
    if method == "mpo":
        again, _ = tensorize(new, rank=2)  # compressed anew: through the dense counterpart, still frozen
        assert trainable(again) == flags
        direct = again[0].eval().to_linear()  # a layer's own dense form: frozen and in the mode where it is
        assert not direct.training and not any(p.requires_grad for p in direct.parameters())
        densify(again)  # (in place)
        assert trainable(again) == {"0.weight": False, "0.bias": False, "2.weight": True, "2.bias": False,
                                    "3.weight": False, "3.bias": True}
        attention = nn.MultiheadAttention(16, 2)
        attention.in_proj_weight.requires_grad_(False)
        held, _ = tensorize(nn.Sequential(attention), rank=2, allow_larger=True)
        cores = {n: v for n, v in trainable(held).items() if ".cores." in n}
        assert cores and all(v == ("out_proj" in n) for n, v in cores.items())


@pytest.mark.parametrize("method", ["mpo", "adtn"])
def test_converted_layers_take_the_mode_of_what_they_replace(method):
    """An eval-mode model came back from tensorize with its converted layers in training mode (an ADTN there
    regenerates its weight at every call instead of keeping it): every converted layer and parametrization now
    takes the mode of the module it replaces or the module whose tensor it holds; frozen tensors held by
    mpo_parametrize / adtn_parametrize stay frozen."""
    from torch.nn.utils import parametrize

    from torchtn.layers import adtn_parametrize, mpo_parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1), nn.MultiheadAttention(16, 2)).eval()
    kw = {"rank": 4} if method == "mpo" else {"fit_steps": 2, "method": "adtn"}
    def modes(m):  # (PyTorch's parametrize makes its own containers in training mode, whatever the owner's)
        return {mod.training for mod in m.modules()
                if not isinstance(mod, (nn.ModuleDict, parametrize.ParametrizationList))}

    assert modes(tensorize(model, allow_larger=True, **kw)[0]) == {False}
    assert modes(tensorize(model.train(), allow_larger=True, **kw)[0]) == {True}
    for hold, kwargs in ((mpo_parametrize, {"rank": 2}), (adtn_parametrize, {})):
        linear = nn.Linear(8, 8).eval()
        linear.weight.requires_grad_(False)
        held = hold(linear, "weight", **kwargs)
        assert not held.training and not any(p.requires_grad for p in held.parameters())
        assert linear.bias.requires_grad
