"""Data-aware truncation: the weighted norm, its optimality, the calibration statistics and tensorize(calibration=)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchtn import MPOEmbedding, MPOLinear, calibrate, tensorize
from torchtn.core import TTMatrix, Weighting, two_core_shapes


def _data(seed=0, rows=24, cols=18, samples=400):
    """A weight, correlated inputs (a few strong directions) and skewed row counts, float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -2, cols, dtype=torch.float64)
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ mix
    counts = torch.randint(0, 40, (rows,), generator=g).double() ** 2
    return w, x, counts


def _best_weighted(w, d, lower, r):
    """Independent reference: D⁻¹ · SVD_r(D W L) · L⁻¹ with explicit inverses."""
    u, s, vh = torch.linalg.svd(torch.diag(d) @ w @ lower)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    return torch.diag(1 / d) @ best @ torch.linalg.inv(lower), s


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_two_core_truncation_is_the_optimum_of_the_weighted_norm(rank):
    w, x, counts = _data()
    wt = Weighting.from_stats(input_gram=x.T @ x, row_counts=counts, ridge=1e-12)
    i, o = two_core_shapes(*w.shape)
    tt = TTMatrix.from_dense(w, i, o, max_rank=rank, weighting=wt)
    assert tt.ranks == (1, rank, 1) and tt.in_shape == (1, 18) and tt.out_shape == (24, 1)
    approx = tt.to_dense()
    d, lower = ((counts + 1) / (counts + 1).sum()).sqrt(), wt.col_factor  # frequencies, add-one smoothed
    reference, s = _best_weighted(w, d, lower, rank)
    torch.testing.assert_close(approx, reference, rtol=1e-8, atol=1e-8)
    # Eckart–Young in the weighted norm: the squared error is exactly the discarded weighted spectrum …
    err = torch.linalg.vector_norm(torch.diag(d) @ (w - approx) @ lower)
    torch.testing.assert_close(err, s[rank:].square().sum().sqrt(), rtol=1e-9, atol=1e-12)
    # … which is the output error on the data (row-weighted), and no other rank-r matrix does better
    out_err = torch.linalg.vector_norm(d[:, None] * ((w - approx) @ x.T))
    torch.testing.assert_close(out_err, err, rtol=1e-6, atol=1e-9)
    plain = TTMatrix.from_dense(w, i, o, max_rank=rank).to_dense()
    assert torch.linalg.vector_norm(d[:, None] * ((w - plain) @ x.T)) > out_err * 1.01
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a, b = tt.cores[0][0, :, 0, :], tt.cores[1][:, 0, :, 0]
        a2 = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=a.dtype)
        b2 = b + 1e-3 * torch.randn(b.shape, generator=g, dtype=b.dtype)
        assert torch.linalg.vector_norm(d[:, None] * ((w - a2 @ b2) @ x.T)) > out_err


def test_weighted_cores_come_back_balanced_and_exact():
    """Undoing the weights can put orders of magnitude between the two cores (rare rows by 1/√p); the cores come
    back in the balanced gauge: every column of A has the norm of the matching row of B, the product unchanged."""
    w, x, counts = _data(seed=5)
    counts[0] = 1e6  # one very frequent row: the others' weights are tiny, their rows in A huge before balancing
    wt = Weighting.from_stats(input_gram=x.T @ x / 400, row_counts=counts)
    i, o = two_core_shapes(*w.shape)
    tt = TTMatrix.from_dense(w, i, o, max_rank=6, weighting=wt)
    a, b = tt.cores[0][0, :, 0, :], tt.cores[1][:, 0, :, 0]
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-10, atol=0)
    unbalanced = TTMatrix([tt.cores[0] * 1e3, tt.cores[1] / 1e3])
    again = unbalanced.balanced()
    torch.testing.assert_close(again.to_dense(), tt.to_dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.cores[0], tt.cores[0], rtol=1e-10, atol=1e-12)
    # more cores: every bond balanced left to right, the matrix unchanged
    many = TTMatrix.from_dense(torch.randn(16, 27, dtype=torch.float64), (3, 3, 3), (2, 2, 4), max_rank=4)
    bal = many.balanced()
    torch.testing.assert_close(bal.to_dense(), many.to_dense(), rtol=1e-10, atol=1e-10)
    last = bal.cores[-2].reshape(-1, bal.cores[-2].shape[-1]).norm(dim=0)
    torch.testing.assert_close(last, bal.cores[-1].reshape(bal.cores[-1].shape[0], -1).norm(dim=1), rtol=1e-10, atol=0)


def test_rel_tol_bounds_the_weighted_error_and_each_factor_alone_works():
    w, x, counts = _data(seed=2)
    i, o = two_core_shapes(*w.shape)
    for wt in (Weighting.from_stats(input_gram=x.T @ x), Weighting.from_stats(row_counts=counts),
               Weighting.from_stats(input_gram=x.T @ x, row_counts=counts)):
        for tol in (0.05, 0.3):
            tt = TTMatrix.from_dense(w, i, o, rel_tol=tol, weighting=wt)
            assert wt.error(w, tt.to_dense()) <= tol + 1e-12
        assert tt.ranks[1] < 18  # rel_tol 0.3 truncates
    # a full-rank two-core MPO is exact in any norm
    tt = TTMatrix.from_dense(w, i, o, weighting=Weighting.from_stats(input_gram=x.T @ x, row_counts=counts))
    torch.testing.assert_close(tt.to_dense(), w, rtol=1e-9, atol=1e-9)


def test_rank_deficient_gram_still_factors_and_bad_stats_are_named():
    x = torch.randn(5, 12, dtype=torch.float64)  # 5 samples for 12 features: a singular Gram
    wt = Weighting.from_stats(input_gram=x.T @ x)
    lower = wt.col_factor
    assert bool(torch.isfinite(lower).all()) and bool((lower.diagonal() > 0).all())
    with pytest.raises(ValueError, match="square"):
        Weighting.from_stats(input_gram=torch.ones(3, 4))
    with pytest.raises(ValueError, match="counts >= 0"):
        Weighting.from_stats(row_counts=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="first core"):
        wt2 = Weighting.from_stats(row_counts=torch.ones(12))
        TTMatrix.from_dense(torch.randn(12, 6), (2, 3), (3, 4), weighting=wt2)
    with pytest.raises(ValueError, match="last core"):
        TTMatrix.from_dense(torch.randn(6, 12), (3, 4), (6, 1), weighting=wt)
    with pytest.raises(ValueError, match="column weights of size 12"):
        TTMatrix.from_dense(torch.randn(6, 10), (1, 10), (6, 1), weighting=wt)


def test_output_sensitivity_makes_the_truncation_optimal_for_the_next_layers_output():
    """y = W2 (W1 x): the error of W1's truncation that reaches y is ‖W2 (W1 − Ŵ1) X‖ = ‖Rᵀ (W1 − Ŵ1) L‖ with
    R Rᵀ = W2ᵀ W2 — exactly the two-sided norm, whose two-core truncation is then the optimum on y."""
    w, x, _ = _data(seed=3)
    g = torch.Generator().manual_seed(4)
    w2 = torch.randn(6, 24, generator=g, dtype=torch.float64)  # sees only 6 of the 24 directions W1 writes
    wt = Weighting.from_stats(input_gram=x.T @ x, output_gram=w2.T @ w2, ridge=1e-12)
    assert wt.row_factor is not None and wt.row_weights is None
    i, o = two_core_shapes(*w.shape)
    for rank in (2, 5):
        approx = TTMatrix.from_dense(w, i, o, max_rank=rank, weighting=wt).to_dense()
        r, lower = wt.row_factor, wt.col_factor
        u, s, vh = torch.linalg.svd(r.T @ w @ lower)
        reference = torch.linalg.inv(r.T) @ (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(lower)
        torch.testing.assert_close(approx, reference, rtol=1e-7, atol=1e-7)
        final = torch.linalg.vector_norm(w2 @ (w - approx) @ x.T)
        torch.testing.assert_close(final, s[rank:].square().sum().sqrt(), rtol=1e-6, atol=1e-9)
        one_sided = TTMatrix.from_dense(w, i, o, max_rank=rank,
                                        weighting=Weighting.from_stats(input_gram=x.T @ x)).to_dense()
        assert torch.linalg.vector_norm(w2 @ (w - one_sided) @ x.T) > 1.05 * final
    # rank 6 reaches everything W2 can see: the error on y vanishes although W1 itself is far from exact
    exact_on_y = TTMatrix.from_dense(w, i, o, max_rank=6, weighting=wt).to_dense()
    assert float(torch.linalg.vector_norm(w2 @ (w - exact_on_y) @ x.T) / torch.linalg.vector_norm(w2 @ w @ x.T)) < 1e-5
    assert float(torch.linalg.vector_norm(w - exact_on_y) / torch.linalg.vector_norm(w)) > 0.3
    # a table: its outputs are rows, so their sensitivity weighs the columns: ‖diag(√p) (W − Ŵ) R‖
    counts = torch.arange(24, dtype=torch.float64)
    table = Weighting.from_stats(row_counts=counts, output_gram=w2[:, :18].T @ w2[:, :18], ridge=1e-12)
    assert table.row_weights is not None and table.col_factor is not None and table.row_factor is None
    torch.testing.assert_close(table.col_factor @ table.col_factor.T, w2[:, :18].T @ w2[:, :18], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        Weighting.from_stats(input_gram=x.T @ x, row_counts=counts, output_gram=w2.T @ w2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.fc1 = nn.Linear(36, 20)
        self.fc2 = nn.Linear(20, 5)
        self.conv = nn.Conv2d(1, 2, 3)  # not calibrated

    def forward(self, ids):
        h = torch.relu(self.fc1(self.emb(ids).flatten(1)))
        return self.fc2(h)


def test_calibrate_records_exact_grams_and_counts_and_restores_the_mode():
    torch.manual_seed(0)
    net = _Net().double().train()
    batches = [torch.randint(0, 20, (16, 3)) for _ in range(3)]
    stats = calibrate(net, batches)
    assert net.training and set(stats) == {"emb", "fc1", "fc2"}
    ids = torch.cat(batches)
    torch.testing.assert_close(stats["emb"].row_counts, torch.bincount(ids.reshape(-1), minlength=50).double())
    x1 = net.emb(ids).flatten(1).detach()
    torch.testing.assert_close(stats["fc1"].input_gram, x1.T @ x1)
    x2 = torch.relu(net.fc1(x1)).detach()
    torch.testing.assert_close(stats["fc2"].input_gram, x2.T @ x2)
    assert stats["fc1"].samples == 48 and stats["emb"].samples == 144
    # a callable that runs the model itself gives the same statistics
    again = calibrate(net, lambda: [net(b) for b in batches])
    torch.testing.assert_close(again["fc2"].input_gram, stats["fc2"].input_gram)
    with pytest.raises(ValueError, match="saw no"):
        calibrate(nn.Sequential(nn.ReLU()), [torch.zeros(2)])
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(3x7 and 8x4\)"):
        calibrate(nn.Sequential(nn.Linear(8, 4)), [torch.zeros(3, 7)])  # the layer's own message, not the hook's


def test_calibrate_output_sensitivity_estimates_the_jacobian_gram_without_touching_gradients():
    torch.manual_seed(0)
    net = _Net().double()
    net.fc1.weight.requires_grad_(False)  # a frozen parameter stays frozen
    batches = [torch.randint(0, 20, (16, 3)) for _ in range(3)]
    stats = calibrate(net, batches, output=lambda y, _b: y, probes=600, seed=1)
    assert all(p.grad is None for p in net.parameters()) and not net.fc1.weight.requires_grad
    plain = calibrate(net, batches)
    torch.testing.assert_close(stats["fc1"].input_gram, plain["fc1"].input_gram)  # the inputs are counted once
    assert stats["fc1"].samples == 48 and stats["emb"].samples == 144
    # exact E_u[g gᵀ]: fc2's output is the output (J = I); fc1's reaches it through relu and fc2: J = W2 diag(h > 0)
    ids = torch.cat(batches)
    h = net.fc1(net.emb(ids).flatten(1)).detach()
    exact_fc1 = sum((net.fc2.weight * (hs > 0)).T @ (net.fc2.weight * (hs > 0)) for hs in h).detach()
    for name, exact, n in (("fc2", 48 * torch.eye(5, dtype=torch.float64), 48), ("fc1", exact_fc1, 48)):
        est = stats[name].output_gram / 600
        assert stats[name].output_samples == 600 * n
        assert float(torch.linalg.matrix_norm(est - exact) / torch.linalg.matrix_norm(exact)) < 0.1
    assert stats["emb"].output_gram.shape == (12, 12) and stats["emb"].output_samples == 600 * 144
    with pytest.raises(ValueError, match="iterable"):
        calibrate(net, lambda: None, output=lambda y, _b: y)
    with pytest.raises(ValueError, match="probes=0"):
        calibrate(net, batches, output=lambda y, _b: y, probes=0)
    with pytest.raises(ValueError, match=r"\(batch, k\)"):
        calibrate(net, batches, output=lambda y, _b: y.sum())


def test_tensorize_with_calibration_lowers_every_layers_output_error_at_the_same_ranks():
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():  # skewed, correlated inputs: only 20 of 50 ids are used, embedding rows of varied scale
        net.emb.weight.mul_(torch.logspace(0, -1, 12, dtype=torch.float64))
    batches = [torch.randint(0, 20, (64, 3)) for _ in range(4)]
    stats = calibrate(net, batches)
    calibrated, report = tensorize(net, rank=2, calibration=stats, skip=["conv"])
    plain, _ = tensorize(net, rank=2, shapes={"fc1": ((1, 36), (20, 1)), "fc2": ((1, 20), (5, 1))}, skip=["conv"])
    assert isinstance(calibrated.emb, MPOEmbedding) and isinstance(calibrated.fc1, MPOLinear)
    assert calibrated.fc1.in_shape == (1, 36) and calibrated.emb.vocab_shape == (50, 1)
    rows = {r.name: r for r in report.layers}
    assert rows["fc1"].output_error is not None and "output error (calibration)" in report.table()
    ids = torch.cat(batches)
    x1 = net.emb(ids).flatten(1).detach()
    for name, x in (("fc1", x1), ("fc2", torch.relu(net.fc1(x1)).detach())):
        w = getattr(net, name).weight.detach()
        ours = (w - getattr(calibrated, name).weight.detach()) @ x.T
        theirs = (w - getattr(plain, name).weight.detach()) @ x.T
        assert torch.linalg.vector_norm(ours) < torch.linalg.vector_norm(theirs)
        torch.testing.assert_close(float(torch.linalg.vector_norm(ours) / torch.linalg.vector_norm(w @ x.T)),
                                   rows[name].output_error, rtol=1e-3, atol=1e-6)
    used = ids.reshape(-1)
    emb_err = (calibrated.emb(used) - net.emb(used)).detach().norm()
    plain_emb = MPOEmbedding.from_tt(net.emb, TTMatrix.from_dense(net.emb.weight.detach(), (1, 12), (50, 1),
                                                                   max_rank=2))
    assert emb_err < (plain_emb(used) - net.emb(used)).detach().norm()
    # the whole-model budget works on the weighted spectra too
    _, by_ratio = tensorize(net, ratio=2, calibration=stats, skip=["conv"])
    assert by_ratio.compression_ratio >= 2


def test_output_sensitive_calibration_lowers_the_models_output_error_and_shares_the_budget_absolutely():
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():
        net.fc1.weight[10:] *= 3  # fc1's largest outputs …
        net.fc2.weight[:, 10:] *= 0.01  # … are those fc2 barely reads: fc1's error there hardly matters
    batches = [torch.randint(0, 20, (64, 3)) for _ in range(4)]
    one_sided = calibrate(net, batches)
    sensitive = calibrate(net, batches, output=lambda y, _b: y, probes=32)
    ids = torch.cat(batches)
    errors = {}
    for label, stats in (("inputs", one_sided), ("outputs", sensitive)):
        model, _ = tensorize(net, rank=3, calibration=stats, skip=["conv", "fc2", "emb"])
        with torch.no_grad():
            errors[label] = float(torch.linalg.vector_norm(model(ids) - net(ids)))
    assert errors["outputs"] < 0.8 * errors["inputs"]
    # sensitive statistics put every layer's error in the output's units: the default allocation is absolute
    _, default = tensorize(net, ratio=2, calibration=sensitive, skip=["conv"])
    _, absolute = tensorize(net, ratio=2, calibration=sensitive, skip=["conv"], allocation="absolute")
    _, relative = tensorize(net, ratio=2, calibration=one_sided, skip=["conv"], allocation="relative")
    _, one_sided_default = tensorize(net, ratio=2, calibration=one_sided, skip=["conv"])
    assert [r.ranks for r in default.layers] == [r.ranks for r in absolute.layers]
    assert [r.ranks for r in one_sided_default.layers] == [r.ranks for r in relative.layers]


def test_tensorize_keeps_the_most_looked_up_rows_exact_and_counts_them_against_the_budget():
    torch.manual_seed(0)
    net = _Net().double()
    batches = [torch.randint(0, 20, (64, 3)) for _ in range(4)] + [torch.full((64, 3), 33), torch.full((40, 3), 7)]
    stats = calibrate(net, batches)
    model, report = tensorize(net, ratio=1.5, calibration=stats, skip=["conv"], exact_rows=2)
    emb = model.emb
    assert emb.exact_rows == 2 and sorted(torch.nonzero(emb.slot < 0).squeeze(1).tolist()) == [7, 33]
    torch.testing.assert_close(emb.weight[[7, 33]], net.emb.weight[[7, 33]], rtol=0, atol=0)
    assert report.params_after == sum(p.numel() for p in model.parameters()) and report.compression_ratio >= 1.5
    row = next(r for r in report.layers if r.name == "emb")
    assert row.params_after == emb.tt.num_params + 2 * 12 and row.params_before == 50 * 12
    # errors are reported over the whole table: the exact rows count with zero error
    w, approx = net.emb.weight.detach(), emb.weight.detach()
    assert row.rel_error == pytest.approx(float((approx - w).norm() / w.norm()), rel=1e-9)
    # a fraction: the fewest most-looked-up rows that cover it
    counts = stats["emb"].row_counts
    covered = counts.sort(descending=True).values.cumsum(0) / counts.sum()
    half, _ = tensorize(net, rank=2, calibration=stats, skip=["conv"], exact_rows=0.5)
    assert half.emb.exact_rows == int((covered < 0.5).sum()) + 1
    for bad in (0, 1.5, True, -2):
        with pytest.raises(ValueError, match="exact_rows="):
            tensorize(net, rank=2, calibration=stats, skip=["conv"], exact_rows=bad)
    with pytest.raises(ValueError, match="calibrated nn.Embedding"):
        tensorize(net, rank=2, skip=["conv"], exact_rows=3)


def test_tensorize_calibration_bad_inputs_are_named():
    net = _Net()
    stats = calibrate(net, [torch.randint(0, 50, (4, 3))])
    with pytest.raises(ValueError, match="does not have"):
        tensorize(net, rank=2, calibration={"nope": stats["fc1"]})
    with pytest.raises(ValueError, match="both shapes= and calibration"):
        tensorize(net, rank=2, calibration=stats, shapes={"fc1": ((6, 6), (4, 5))})
    with pytest.raises(ValueError, match="calibration for 'fc2' cannot be used for the layer"):
        tensorize(net, rank=2, calibration={"fc2": stats["fc1"]})
    nan = calibrate(net, [torch.randint(0, 50, (4, 3))])
    nan["fc1"].input_gram[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration for 'fc1' cannot be used for the layer: .*NaN"):
        tensorize(net, rank=2, calibration=nan)
    with pytest.raises(ValueError, match="only nn.Linear and nn.Embedding"):
        tensorize(net, rank=2, calibration={"conv": stats["fc1"]})


def test_two_core_embedding_lookup_equals_the_table_in_training_and_eval():
    torch.manual_seed(0)
    layer = MPOEmbedding(40, 10, rank=6, vocab_shape=(40, 1), dim_shape=(1, 10), dtype=torch.float64)
    ids = torch.randint(0, 40, (3, 5))
    table = layer.tt.to_dense()
    expected = F.embedding(ids, table)
    out = layer(ids)  # few ids: the per-id path (a gather of the first core, one matmul with the second)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    grads = [c.grad.clone() for c in layer.cores]
    for c in layer.cores:
        c.grad = None
    F.embedding(ids, layer.tt.to_dense()).square().sum().backward()
    for g, c in zip(grads, layer.cores):
        torch.testing.assert_close(g, c.grad, rtol=1e-10, atol=1e-12)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), expected, rtol=1e-12, atol=1e-12)
