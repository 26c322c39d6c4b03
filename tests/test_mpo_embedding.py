"""MPOEmbedding: lookups equal F.embedding of its own dense table; TT-SVD of a trained table; tensorize; files."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchtn
from torchtn import MPOEmbedding
from torchtn.layers.mpo_embedding import vocab_modes


def test_lookup_equals_f_embedding_of_the_dense_table_in_float64():
    torch.manual_seed(0)
    layer = MPOEmbedding(997, 24, rank=5).double()  # 997 is prime: the vocabulary is padded
    assert torch.prod(torch.tensor(layer.vocab_shape)) >= 997
    table = layer.tt.to_dense()[:997]  # rebuilt independently of the lookup path
    ids = torch.cat([torch.randint(0, 997, (40,)), torch.tensor([0, 996])]).reshape(6, 7)
    torch.testing.assert_close(layer(ids), F.embedding(ids, table), rtol=0, atol=1e-12)
    assert layer(ids).shape == (6, 7, 24)
    # gradients reach every core
    layer(ids).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_from_dense_is_exact_at_full_rank_and_bounded_by_rel_tol():
    torch.manual_seed(1)
    emb = nn.Embedding(60, 12).double()
    full = MPOEmbedding.from_dense(emb)
    ids = torch.arange(60)
    torch.testing.assert_close(full(ids), emb(ids), rtol=0, atol=1e-10)
    approx = MPOEmbedding.from_dense(emb, rel_tol=0.3)
    err = torch.linalg.norm(approx(ids) - emb(ids)) / torch.linalg.norm(emb.weight)
    assert err <= 0.3 + 1e-9
    assert MPOEmbedding.from_dense(emb, rank=2).num_weight_params < full.num_weight_params


def test_tensorize_converts_embeddings_and_keeps_padding_rows_exact(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(4096, 64), nn.Flatten(), nn.Linear(64 * 3, 10))
    new, report = torchtn.tensorize(model, rank=16, skip=["2"])
    assert isinstance(new[0], MPOEmbedding) and report.layers[0].layer_type == "MPOEmbedding"
    ids = torch.randint(0, 4096, (5, 3))
    assert new(ids).shape == (5, 10)
    assert sum(p.numel() for p in new.parameters()) < sum(p.numel() for p in model.parameters())
    # nn.Embedding(padding_idx=...): the padding row is kept exactly (a trained one need not be zero), gets no gradient
    padded = nn.Embedding(4096, 64, padding_idx=7)
    with torch.no_grad():
        padded.weight[7] = torch.linspace(-1, 1, 64)
    small, _ = torchtn.tensorize(nn.Sequential(padded), rank=4)
    layer = small[0]
    assert layer.padding_idx == 7 and layer.ranks == (1, 4, 4, 1)
    ids = torch.tensor([[7, 3, 7], [4095, 7, 0]])
    out = layer(ids)
    torch.testing.assert_close(out[0, 0], padded.weight[7].detach(), rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], layer.tt.to_dense()[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight[7], padded.weight[7].detach(), rtol=0, atol=0)
    with torch.no_grad():  # inference gathers from the cached table: the same rows
        torch.testing.assert_close(layer(ids), out.detach(), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert layer.padding_row.grad is None and all(c.grad is not None for c in layer.cores)
    torchtn.save_model(small, tmp_path / "p.safetensors")
    again = torchtn.load_model(tmp_path / "p.safetensors", nn.Sequential(nn.Embedding(4096, 64, padding_idx=7)))
    torch.testing.assert_close(again(ids), layer(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="padding_idx=4096"):
        MPOEmbedding(4096, 64, padding_idx=4096)


def test_save_load_and_bad_ids(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(MPOEmbedding(300, 16, rank=4))
    torchtn.save_model(model, tmp_path / "m.safetensors")
    again = torchtn.load_model(tmp_path / "m.safetensors", nn.Sequential(nn.Embedding(300, 16)))
    ids = torch.randint(0, 300, (4, 5))
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 300\)"):
        model(torch.tensor([300]))
    with pytest.raises(TypeError, match="int64 or int32"):
        model(torch.tensor([1.0]))
    assert vocab_modes(30522, 3) == (30, 32, 32)


def test_training_lookups_rebuild_the_table_for_large_batches_with_the_same_gradients():
    from torchtn.layers.mpo_embedding import _gathered_per_id, mpo_embedding

    torch.manual_seed(4)
    layer = MPOEmbedding(300, 16, rank=6).double()
    ids = torch.randint(0, 300, (40, 50))
    assert ids.numel() * _gathered_per_id(layer.core_list()) > 4 * 300 * 16  # the table path is taken
    weights = torch.randn(40, 50, 16, dtype=torch.float64)
    (layer(ids) * weights).sum().backward()
    table_grads = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    (mpo_embedding(ids, layer.core_list()) * weights).sum().backward()  # the per-id path
    for a, b in zip(table_grads, layer.cores):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-10)


def test_exact_rows_are_kept_exactly_beside_the_mpo_of_the_others(tmp_path):
    torch.manual_seed(5)
    dense = nn.Embedding(300, 16, padding_idx=2).double()
    exact = torch.tensor([17, 3, 250, 2])  # the padding id among them too
    rest = torch.tensor([i for i in range(300) if i not in exact.tolist()])
    from torchtn.core import TTMatrix
    tt = TTMatrix.from_dense(dense.weight.detach()[rest], (1, 16), (296, 1), max_rank=4)
    layer = MPOEmbedding.from_tt(dense, tt, exact_ids=exact)
    assert layer.exact_rows == 4 and layer.vocab_shape == (296, 1)
    assert sum(p.numel() for p in layer.parameters()) == tt.num_params + 4 * 16 == layer.num_weight_params
    assert layer.compression_ratio == pytest.approx(300 * 16 / (tt.num_params + 4 * 16))
    ids = torch.randint(0, 300, (6, 7))
    ids[0, :4] = exact
    # the table: exact rows exactly the dense ones, the others the MPO's rows in increasing id order
    expected = torch.empty(300, 16, dtype=torch.float64)
    expected[rest] = tt.to_dense()
    expected[exact] = dense.weight.detach()[exact]
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
    for grad in (False, True):  # cached-table inference and the differentiable per-id path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(ids), F.embedding(ids, expected), rtol=1e-12, atol=1e-12)
    (layer(ids) * torch.randn(6, 7, 16, dtype=torch.float64)).sum().backward()
    assert layer.exact.grad is not None and bool(layer.exact.grad.abs().sum(1)[:3].gt(0).all())
    assert all(c.grad is not None for c in layer.cores)
    torch.testing.assert_close(layer.to_embedding().weight, expected, rtol=0, atol=0)
    # a model file records the exact rows and where every id lives
    torchtn.save_model(nn.Sequential(layer), tmp_path / "x.safetensors")
    again = torchtn.load_model(tmp_path / "x.safetensors", nn.Sequential(nn.Embedding(300, 16, padding_idx=2).double()))
    torch.testing.assert_close(again[0](ids), layer(ids), rtol=0, atol=0)
    assert again[0].exact_rows == 4
    with pytest.raises(ValueError, match="distinct ids"):
        MPOEmbedding.from_tt(dense, tt, exact_ids=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="exact_rows=300"):
        MPOEmbedding(300, 16, exact_rows=300)


def test_a_file_whose_slots_do_not_place_every_id_once_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dense = nn.Embedding(50, 8)
    tt = torchtn.TTMatrix.from_dense(dense.weight.detach()[2:], (1, 8), (48, 1), max_rank=3)
    model = nn.Sequential(MPOEmbedding.from_tt(dense, tt, exact_ids=[0, 1]))
    path = tmp_path / "e.safetensors"
    torchtn.save_model(model, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["0.slot"][5] = tensors["0.slot"][6]  # two ids in one row, one row never used
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises((ValueError, torchtn.ModelFileError), match="place each of the 50 ids once"):
        torchtn.load_model(path, nn.Sequential(nn.Embedding(50, 8)))


def test_torch_compile_full_graph_with_a_device_side_id_check():
    """Under ``torch.compile`` the lookup is one graph (no read-back of the ids to check their range) in training and
    in eval, equals the eager lookup, and an out-of-range id still raises (the asynchronous assert)."""
    torch._dynamo.reset()
    emb = MPOEmbedding.from_dense(nn.Embedding(300, 16), rank=4)
    compiled = torch.compile(emb, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    ids = torch.randint(0, 300, (3, 5))
    assert torch.allclose(compiled(ids), emb(ids), atol=1e-6)
    emb.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(ids), emb(ids), atol=1e-6)
        # the asynchronous assert, or the gather from the table of exactly 300 rows, whichever runs first
        with pytest.raises((RuntimeError, IndexError), match=r"ids must be in \[0, 300\)|index out of range"):
            compiled(torch.tensor([[1, 300]]))


@pytest.mark.parametrize("option", [dict(max_norm=1.0), dict(scale_grad_by_freq=True)])
def test_an_embedding_whose_lookups_an_mpo_cannot_compute_stays_dense(option):
    """max_norm renormalizes looked-up rows in place and scale_grad_by_freq scales rows' gradients by their counts:
    an MPO table cannot do either, so from_dense refuses and tensorize keeps the table dense, saying why (before,
    both were dropped silently: other outputs with max_norm)."""
    torch.manual_seed(0)
    table = nn.Embedding(100, 16, **option)
    key = next(iter(option))
    with pytest.raises(ValueError, match=rf"cannot become an MPOEmbedding: {key}="):
        MPOEmbedding.from_dense(table, rank=4)
    model = nn.Sequential(table, nn.Flatten(), nn.Linear(48, 4))
    new, report = torchtn.tensorize(model, rank=2)
    assert type(new[0]) is nn.Embedding and isinstance(new[2], torchtn.MPOLinear)
    assert any(s.startswith(f"0 ({key}=") for s in report.skipped)


def test_reset_parameters_makes_a_meta_built_table_whole_padding_and_exact_rows_included():
    with torch.device("meta"):
        table = MPOEmbedding(60, 8, rank=3, padding_idx=2, exact_rows=5)
    table = table.to_empty(device="cpu")  # memory, no values: the padding row and the slots are garbage
    table.reset_parameters()
    ids = torch.arange(60)
    out = table(ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(8))  # the padding row, zero as nn.Embedding's
    assert torch.equal(table.slot, torch.cat([torch.arange(-1, -6, -1), torch.arange(55)]))  # ids 0 … 4 exact
    torch.testing.assert_close(out[[0, 1, 3, 4]], table.exact[[0, 1, 3, 4]], rtol=0, atol=0)
    assert 0.5 < float(table.exact.detach().std()) < 1.5  # nn.Embedding's N(0, 1)


def test_an_out_of_range_id_raises_under_torch_func_too():
    """Under ``torch.func`` (no read-back, no asynchronous assert) the lookup is a gather from the table of exactly
    ``num_embeddings`` rows, which checks the ids; the MPO's modes cover 64 rows here, so a gather from the whole
    rebuilt matrix returned a row of padding for id 60 silently."""
    from torch.func import functional_call, vmap

    table = MPOEmbedding(50, 8, 3)
    assert math.prod(table.vocab_shape) > 60
    params = {k: v.detach() for k, v in table.named_parameters()}
    lookup = vmap(lambda i: functional_call(table, params, (i,)))
    good = torch.tensor([[1, 2], [3, 49]])
    torch.testing.assert_close(lookup(good), table(good), rtol=0, atol=1e-6)
    with pytest.raises(IndexError, match="index out of range"):
        lookup(torch.tensor([[1, 2], [3, 60]]))
