"""Tensors no drop-in layer can replace, held as MPOs: ``mpo_parametrize`` and ``nn.MultiheadAttention`` in
``tensorize``."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchtn
from torchtn.cli import main
from torchtn.layers import MPOParametrization, mpo_parametrize


def test_a_parametrized_tensor_is_its_tt_svd_and_trains_through_its_cores():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, dtype=torch.float64)
    dense = linear.weight.detach().clone()
    exact = mpo_parametrize(linear, "weight")  # no cap: the exact TT-SVD
    torch.testing.assert_close(linear.weight, dense, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in linear.parameters()) == exact.num_weight_params + 16  # the dense copy is gone
    assert linear.parametrizations.weight.original.numel() == 0

    # two modes: a rank-r TT-matrix is a rank-r matrix, so the truncation error is Eckart–Young's
    conv = nn.Conv2d(6, 8, 3, dtype=torch.float64)  # (8, 6, 3, 3): the (8, 54) matrix
    matrix = conv.weight.detach().reshape(8, -1).clone()
    tail = torch.linalg.svdvals(matrix)[3:]
    mpo_parametrize(conv, "weight", rank=3, in_shape=(1, 54), out_shape=(8, 1))
    assert conv.weight.shape == (8, 6, 3, 3)
    err = torch.linalg.matrix_norm(conv.weight.detach().reshape(8, -1) - matrix)
    assert err.item() == pytest.approx(torch.linalg.vector_norm(tail).item(), rel=1e-9)

    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    conv(x).square().sum().backward()
    cores = list(conv.parametrizations.weight[0].cores)
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)


def test_parametrize_refuses_what_it_cannot_hold():
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no non-empty floating-point tensor called 'wieght'"):
        mpo_parametrize(linear, "wieght")
    mpo_parametrize(linear, "weight", rank=2)
    with pytest.raises(ValueError, match="parametrized already"):
        mpo_parametrize(linear, "weight")
    with pytest.raises(ValueError, match="rel_tol"):
        mpo_parametrize(nn.Linear(4, 4), "weight", rel_tol=2.0)
    with pytest.raises(ValueError, match="parametrized already"):  # the generated tensor would ignore the MPO's
        torchtn.layers.adtn_parametrize(linear, "weight", depth=1)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_torchtn_parametrization_stacked_with_another_is_not_saved(tmp_path):
    """A file records where the torchtn parametrization sits, not a user's parametrization stacked on it: loaded into
    a skeleton, the model came back without it (outputs off by the factor 2 below) — now saving refuses."""
    linear = nn.Linear(16, 8)
    mpo_parametrize(linear, "weight", rank=2)
    parametrize.register_parametrization(linear, "weight", _Double())
    with pytest.raises(ValueError, match=r"'parametrizations.weight.0': the MPOParametrization shares its tensor "
                                         r"with 1 other parametrization\(s\) \(_Double\)"):
        torchtn.save_model(linear, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _encoder(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, dtype=torch.float64, **kwargs)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_tensorize_holds_multihead_attention_projections_as_mpos(tmp_path, capsys):
    """nn.MultiheadAttention reads in_proj_weight and out_proj.weight directly: tensorize parametrizes them, within
    the whole-model budget; exact at full rank; saved, loaded into a fresh dense model and inspected."""
    model = _encoder()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    exact, _ = torchtn.tensorize(model, rel_tol=1e-12, allow_larger=True)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(exact, mode)()
        with torch.no_grad():
            torch.testing.assert_close(exact(x), model(x), rtol=0, atol=1e-10)

    small, report = torchtn.tensorize(model, ratio=3)
    names = {r.name: r.layer_type for r in report.layers}
    assert names["layers.0.self_attn.in_proj_weight"] == names["layers.1.self_attn.out_proj.weight"] == \
        "MPOParametrization"
    assert report.compression_ratio == pytest.approx(3, rel=0.01) and report.compression_ratio >= 3
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert not report.skipped  # out_proj is no longer kept dense
    row = next(r for r in report.layers if r.name == "layers.0.self_attn.in_proj_weight")
    w = model.layers[0].self_attn.in_proj_weight.detach()
    got = small.layers[0].self_attn.in_proj_weight.detach()
    assert row.rel_error == pytest.approx((torch.linalg.matrix_norm(got - w) / torch.linalg.matrix_norm(w)).item())

    path = torchtn.save_model(small, tmp_path / "encoder.safetensors")
    fresh = torchtn.load_model(path, _encoder())
    small.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))
    assert parametrize.is_parametrized(fresh.layers[1].self_attn, "in_proj_weight")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MPOParametrization" in out
    # named as the report names them (the tensor), not by torch's parametrization registry
    reported = {r.name for r in report.layers if r.layer_type == "MPOParametrization"}
    shown = {line.split()[0] for line in out.splitlines() if "MPOParametrization" in line}
    assert shown == reported and "layers.0.self_attn.out_proj.weight" in shown

    kept, report = torchtn.tensorize(model, rank=2, skip=["*self_attn*"])
    assert sorted(report.skipped) == sorted(f"layers.{i}.self_attn.{t}" for i in (0, 1)
                                            for t in ("in_proj_weight", "out_proj.weight"))
    assert not parametrize.is_parametrized(kept.layers[0].self_attn)


def test_attention_with_other_key_and_value_sizes_has_three_input_projections():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True, dtype=torch.float64)
    model = nn.ModuleDict({"attn": attn})
    new, report = torchtn.tensorize(model, rel_tol=1e-12, allow_larger=True)
    assert sorted(r.name for r in report.layers) == ["attn.k_proj_weight", "attn.out_proj.weight",
                                                     "attn.q_proj_weight", "attn.v_proj_weight"]
    assert all(isinstance(m, MPOParametrization) for m in [new["attn"].parametrizations.q_proj_weight[0]])
    q, k, v = (torch.randn(2, 5, n, dtype=torch.float64) for n in (16, 8, 12))
    torch.testing.assert_close(new["attn"](q, k, v)[0], attn(q, k, v)[0], rtol=0, atol=1e-10)


def test_adtn_tensorize_generates_attention_projections_in_place(tmp_path):
    """method="adtn" fits a generator to each projection an nn.MultiheadAttention reads directly (reported fit
    error = the measured one), and the file loads back into a fresh dense model."""
    model = _encoder()
    new, report = torchtn.tensorize(model, method="adtn", depth=2, fit_steps=30)
    rows = {r.name: r for r in report.layers}
    row = rows["layers.0.self_attn.in_proj_weight"]
    assert row.layer_type == "ADTNParametrization" and row.params_after == row.weight_params
    w = model.layers[0].self_attn.in_proj_weight.detach()
    got = new.layers[0].self_attn.in_proj_weight.detach()
    assert row.rel_error == pytest.approx((torch.linalg.matrix_norm(got - w) / torch.linalg.matrix_norm(w)).item(),
                                          rel=1e-6)
    assert report.params_after == sum(p.numel() for p in new.parameters()) < report.params_before
    path = torchtn.save_model(new, tmp_path / "adtn.safetensors")
    fresh = torchtn.load_model(path, _encoder())
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    new.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), new(x))


def test_a_parametrization_loads_into_a_plain_tensor_only(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16))
    mpo_parametrize(model[0], "weight", rank=2)
    path = torchtn.save_model(model, tmp_path / "p.safetensors")
    x = torch.randn(2, 16)
    assert torch.equal(torchtn.load_model(path, nn.Sequential(nn.Linear(16, 16)))(x), model(x))
    with pytest.raises(torchtn.ModelFileError, match="MPOParametrization layer at '0.parametrizations.weight.0', but "
                                                     "the model has no module there"):
        torchtn.load_model(path, nn.Sequential(torchtn.MPOLinear(16, 16, 2)))  # its weight is a property


def test_reset_parameters_draws_cores_at_pytorchs_variance():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, dtype=torch.float64)
    layer = mpo_parametrize(attn, "in_proj_weight", rank=4)
    layer.reset_parameters()
    with torch.no_grad():
        assert 0.5 < attn.in_proj_weight.var().item() * 3 * 64 < 2.0  # nn.Linear's Var(W) = 1 / (3 · fan_in)
