"""Sweep training (Jahromi & Orús): two-site math against exact references, and the sweep inside the one trainer."""
import math

import pytest
import torch

from torchtn import MPOLinear
from torchtn.core import TTMatrix, entanglement_entropy, merge_cores, tt_to_dense
from torchtn.core.twosite import (
    canonical_error,
    local_grad_from_weight_grad,
    merge_two_site,
    split_two_site,
    with_two_site,
)
from torchtn.data import Dataset, load_digits
from torchtn.functional import mpo_linear
from torchtn.io import load_model, read_metadata
from torchtn.models import HybridMLP, build_model
from torchtn.train import TrainConfig, Trainer, evaluate, measure
from torchtn.train.sweep import SweepConfig, Sweeper


def random_chain(shapes, rank, seed=0):
    """A random float64 TT-matrix in mixed-canonical form with the centre at site 0."""
    torch.manual_seed(seed)
    in_shape, out_shape = shapes
    return TTMatrix.random(in_shape, out_shape, rank, variance=1.0, dtype=torch.float64).right_canonical().cores


def test_merged_chain_is_the_same_matrix_and_split_reports_its_error():
    cores = random_chain(((2, 3, 2), (3, 2, 2)), 5)
    dense = tt_to_dense(cores)
    for bond in range(2):
        theta = merge_two_site(cores, bond)
        assert torch.allclose(tt_to_dense(with_two_site(cores, bond, theta)), dense, atol=1e-12)
        full = split_two_site(theta, (cores[bond].shape[1:3], cores[bond + 1].shape[1:3]))
        assert full.truncation_error < 1e-12
        for cap in (1, 2, 3):
            cut = split_two_site(theta, (cores[bond].shape[1:3], cores[bond + 1].shape[1:3]), max_rank=cap)
            back = merge_two_site([cut.left, cut.right], 0)
            err = float(torch.linalg.vector_norm(back - theta) / torch.linalg.vector_norm(theta))
            assert cut.rank == min(cap, full.rank)
            assert err == pytest.approx(cut.truncation_error, rel=1e-9, abs=1e-12)
            s = full.singular_values  # the optimal (Eckart–Young) error of rank `cap`
            assert err == pytest.approx(float((s[cap:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-9)


def test_cutoff_drops_small_singular_values_and_keeps_one():
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 0.5, 1e-3, 1e-6], dtype=torch.float64)
    mat = (u * s) @ u.T  # the split's matrix: rows (m1 n1) = (2·2), columns (m2 n2) = (2·2)
    theta = mat.reshape(1, 2, 2, 2, 2, 1).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4, 1)  # merged-core layout
    assert torch.allclose(split_two_site(theta, ((2, 2), (2, 2))).singular_values, s, atol=1e-12)
    assert split_two_site(theta, ((2, 2), (2, 2)), cutoff=1e-2).rank == 2
    assert split_two_site(theta, ((2, 2), (2, 2)), cutoff=0.0).rank == 4
    assert split_two_site(torch.zeros_like(theta), ((2, 2), (2, 2))).rank == 1
    with pytest.raises(ValueError, match="cutoff=1.5"):
        split_two_site(theta, ((2, 2), (2, 2)), cutoff=1.5)


def test_manual_environment_gradient_equals_autograd_in_float64():
    torch.manual_seed(0)
    cores = random_chain(((2, 3, 2, 2), (2, 2, 3, 2)), 4)
    x = torch.randn(7, 24, dtype=torch.float64)
    delta = torch.randn(7, 24, dtype=torch.float64)
    weight_grad = delta.T @ x
    for bond in range(3):
        theta = merge_two_site(cores, bond).detach().requires_grad_(True)
        y = mpo_linear(x, with_two_site(cores, bond, theta))
        auto, = torch.autograd.grad((y * delta).sum(), theta)
        manual = local_grad_from_weight_grad(with_two_site(cores, bond, theta.detach()), bond, weight_grad)
        assert (manual - auto).abs().max() < 1e-8 * auto.abs().max()


def projector_step(cores, bond, weight_grad, lr):
    """``W − lr·P(∂L/∂W)`` with ``P`` the orthogonal projection onto the tangent directions of ``Θ`` at ``bond``:
    ``P(G) = L Lᵀ G R Rᵀ`` with ``L`` (``R``) the left (right) environment, orthonormal in mixed-canonical form."""
    out_shape = [c.shape[1] for c in cores]
    in_shape = [c.shape[2] for c in cores]
    a, c = cores[bond].shape[0], cores[bond + 1].shape[3]
    # E_left[(M<, N<), a] and E_right[c, (M>, N>)]
    one = torch.ones(1, 1, 1, dtype=cores[0].dtype)
    el = merge_cores(cores[:bond])[0] if bond else one  # (M<, N<, a)
    er = merge_cores(cores[bond + 2:])[..., 0] if bond + 2 < len(cores) else one  # (c, M>, N>)
    mlt, nlt = el.shape[0], el.shape[1]
    mgt, ngt = er.shape[1], er.shape[2]
    mm = out_shape[bond] * out_shape[bond + 1]
    nn = in_shape[bond] * in_shape[bond + 1]
    g = weight_grad.reshape(mlt, mm, mgt, nlt, nn, ngt)
    coeff = torch.einsum("xipyjq,xya,cpq->aijc", g, el, er)  # the gradient of Θ
    projected = torch.einsum("aijc,xya,cpq->xipyjq", coeff, el, er).reshape(weight_grad.shape)
    assert a == el.shape[2] and c == er.shape[0]
    return tt_to_dense(cores) - lr * projected


def test_at_full_bond_dimension_a_two_site_update_is_the_projected_full_weight_step():
    torch.manual_seed(0)
    shapes = ((2, 3, 2), (2, 2, 3))
    layer = MPOLinear(12, 12, rank=36, in_shape=shapes[0], out_shape=shapes[1], bias=False).double()
    assert layer.ranks == (1, 4, 6, 1)  # full: every bond at its cap, so no truncation can happen
    cores = [c.detach() for c in layer.tt.right_canonical().cores]
    x = torch.randn(9, 12, dtype=torch.float64)
    delta = torch.randn(9, 12, dtype=torch.float64)
    lr = 0.1
    theta = merge_two_site(cores, 0).requires_grad_(True)
    y = mpo_linear(x, with_two_site(cores, 0, theta))
    grad, = torch.autograd.grad((y * delta).sum(), theta)
    split = split_two_site((theta - lr * grad).detach(), ((2, 2), (2, 3)), centre="right")
    assert split.truncation_error < 1e-12
    updated = [split.left, split.right, cores[2]]
    expected = projector_step(cores, 0, delta.T @ x, lr)
    assert torch.allclose(tt_to_dense(updated), expected, atol=1e-10)
    # with two sites (no environment) the projection is the identity: the update is exact SGD on W
    two = [c.detach() for c in MPOLinear(12, 12, rank=144, in_shape=(3, 4), out_shape=(4, 3), bias=False).double()
           .tt.right_canonical().cores]
    theta = merge_two_site(two, 0).requires_grad_(True)
    grad, = torch.autograd.grad((mpo_linear(x, [theta]) * delta).sum(), theta)
    new = split_two_site((theta - lr * grad).detach(), ((4, 3), (3, 4)))
    assert torch.allclose(tt_to_dense([new.left, new.right]), tt_to_dense(two) - lr * delta.T @ x, atol=1e-10)


def test_entropy_of_a_product_weight_is_zero_on_every_bond():
    torch.manual_seed(0)
    factors = [torch.randn(m, n, dtype=torch.float64) for m, n in ((2, 3), (3, 2), (2, 2))]
    cores = [f[None, :, :, None] for f in factors]  # W = W_1 ⊗ W_2 ⊗ W_3: every bond of rank 1
    dense = tt_to_dense(cores)
    assert torch.allclose(dense, torch.kron(torch.kron(factors[0], factors[1]), factors[2]))
    assert entanglement_entropy(cores).abs().max() < 1e-12
    padded = TTMatrix.from_dense(dense, (3, 2, 2), (2, 3, 2))  # exact TT-SVD: ranks (6, 4), all but one s ≈ 0
    assert padded.ranks == (1, 6, 4, 1)
    # in mixed-canonical form around each bond, the split of Θ is the Schmidt decomposition: one value survives
    for bond, chain in ((0, padded.right_canonical().cores), (1, padded.left_canonical().cores)):
        split = split_two_site(merge_two_site(chain, bond), (chain[bond].shape[1:3], chain[bond + 1].shape[1:3]),
                               cutoff=1e-10)
        assert split.rank == 1 and split.entropy == pytest.approx(0.0, abs=1e-12)


def regression_data(n=1200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 16, generator=gen, dtype=torch.float64) * 4 - 2
    y = (x * torch.sin(x)).sum(1, keepdim=True) / 4
    return Dataset("xsinx", x[:900], y[:900], x[900:1050], y[900:1050], x[1050:], y[1050:], (16,), 0)


@pytest.mark.parametrize("sites", [2, 1])
def test_sweep_keeps_the_mpo_mixed_canonical_after_every_update(sites):
    torch.manual_seed(0)
    model = HybridMLP(16, hidden=64, out_features=1, rank=3, hidden_shape=(4, 4, 4)).double()
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=150, lr=1e-2, optimizer="sweep", progress=False,
                                         sweep=SweepConfig(max_rank=6, lr=0.1, sites=sites)), loss="mse")
    sweeper = trainer.sweeper
    errors = []
    visit = Sweeper._visit

    def checked(self, name, layer, where, centre, *args):
        out = visit(self, name, layer, where, centre, *args)
        if centre == "right":  # two-site at bond b, or one-site at site b: the centre is now on site b + 1
            now = where + 1
        else:  # two-site at bond b: on site b; one-site at site k: on site k − 1
            now = where if sites == 2 else where - 1
        errors.append(canonical_error(layer.core_list(), now))
        return out

    sweeper._visit = checked.__get__(sweeper)
    trainer.fit(regression_data())
    assert len(errors) == 6 * 4  # 6 batches, each a full sweep of 2·(3 − 1) visits
    assert max(errors) < 1e-10
    assert all(p.requires_grad for p in model.tn.cores)  # frozen only while the sweep runs
    grown = 6 if sites == 2 else 3  # two-site: grown from 3 to max_rank (the bonds could hold 16); one-site: fixed
    assert model.tn.ranks == (1, grown, grown, 1)
    assert len(sweeper.history) == 1 + 6 and sweeper.history[-1]["ranks"] == [grown, grown]
    assert sweeper.history[0]["step"] == 0 and sweeper.history[0]["ranks"] == [3, 3]  # the start


@pytest.mark.parametrize("options", [dict(), dict(gradient="manual"), dict(recompute=True),
                                     dict(schedule="bond"), dict(local_optimizer="adam", lr=0.01, local_steps=2),
                                     dict(sites=1), dict(sites=1, gradient="manual", recompute=True)])
def test_sweep_training_fits_a_nonlinear_regression(options):
    data = regression_data()
    torch.manual_seed(0)
    model = HybridMLP(16, hidden=64, out_features=1, rank=2, hidden_shape=(4, 4, 4)).double()
    before = measure(model, data.x_test, data.y_test, "mse")["loss"]
    Trainer(model, TrainConfig(epochs=25, batch_size=64, lr=3e-3, optimizer="sweep", progress=False,
                               sweep=SweepConfig(max_rank=8, **{"lr": 0.05, **options})), loss="mse").fit(data)
    after = measure(model, data.x_test, data.y_test, "mse")["loss"]
    assert after < 0.05 * before  # learns x·sin x (the untrained model predicts ~its mean)
    # AdamW on the same rank-2 model reaches 0.42·var; two-site sweeps grow the bonds and do better
    assert after < (0.3 if options.get("sites", 2) == 2 else 0.5) * float(data.y_test.var())


def test_manual_and_autograd_sweeps_give_the_same_model():
    data = regression_data()
    models = []
    for gradient in ("autograd", "manual"):
        torch.manual_seed(0)
        model = HybridMLP(16, hidden=64, out_features=1, rank=2, hidden_shape=(4, 4, 4)).double()
        Trainer(model, TrainConfig(epochs=2, batch_size=64, optimizer="sweep", progress=False,
                                   sweep=SweepConfig(max_rank=8, gradient=gradient)), loss="mse").fit(data)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-9)


def test_hybrid_model_trained_by_sweeps_learns_digits():
    data = load_digits()
    torch.manual_seed(0)
    model = HybridMLP(64, hidden=64, out_features=10, rank=4, hidden_shape=(4, 4, 4))
    trainer = Trainer(model, TrainConfig(epochs=15, batch_size=64, lr=3e-3, optimizer="sweep", progress=False,
                                         sweep=SweepConfig(max_rank=8, lr=0.05)))
    trainer.fit(data)
    assert evaluate(model, data.x_test, data.y_test)[1] >= 0.95
    last = trainer.sweeper.history[-1]
    assert last["layer"] == "tn" and max(last["ranks"]) == 8  # grown from 4 to the cap
    assert all(0 < e <= math.log(r) + 1e-9 for e, r in zip(last["entropy"], last["ranks"]))


def test_a_bond_that_grows_then_shrinks_leaves_no_stale_plan_or_state(tmp_path):
    data = regression_data()
    torch.manual_seed(0)
    model = HybridMLP(16, hidden=64, out_features=1, rank=1, hidden_shape=(4, 4, 4)).double()
    grow = TrainConfig(epochs=2, batch_size=64, optimizer="sweep", progress=False, sweep=SweepConfig(max_rank=16))
    Trainer(model, grow, loss="mse").fit(data)
    grown = model.tn.ranks
    assert grown[1] > 1 and grown[2] > 1
    shrink = TrainConfig(epochs=1, batch_size=64, optimizer="sweep", progress=False,
                         sweep=SweepConfig(max_rank=16, cutoff=0.3))
    trainer = Trainer(model, shrink, loss="mse", checkpoint=tmp_path / "c.safetensors")
    trainer.fit(data)
    shrunk = model.tn.ranks
    assert shrunk[1] < grown[1] and shrunk[2] < grown[2]
    # the layer's outputs follow its current cores (no plan or cache of an old rank is used) ...
    x = data.x_test
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.tn(x @ torch.ones(16, 64, dtype=x.dtype)),
                              (x @ torch.ones(16, 64, dtype=x.dtype)) @ model.tn.weight.T + model.tn.bias, atol=1e-10)
    # ... the ordinary optimizer holds only what it trains (never a core of an old shape) ...
    ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in model.tn.cores}
    # ... and the checkpoint holds the shrunk layer and the sweep record
    meta = read_metadata(tmp_path / "c.safetensors")["metadata"]
    assert meta["sweep"]["history"][-1]["ranks"] == list(shrunk[1:-1])
    again = build_model(model.config()).double()
    load_model(tmp_path / "c.safetensors", again)
    assert again.tn.ranks == shrunk


def test_keep_best_puts_back_the_bonds_of_the_best_epoch():
    data = regression_data()
    torch.manual_seed(0)
    model = HybridMLP(16, hidden=64, out_features=1, rank=1, hidden_shape=(4, 4, 4)).double()
    ranks = []  # the bonds after each epoch: grown to the cap 8 in the first, cut to 1 in the second (a worse fit)

    def cut(record):
        ranks.append(model.tn.ranks)
        trainer.sweeper.config.max_rank = 1

    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=64, lr=1e-2, optimizer="sweep", progress=False,
                                         keep_best=True, sweep=SweepConfig(max_rank=8)), loss="mse", on_epoch_end=cut)
    history = trainer.fit(data)
    assert ranks == [(1, 8, 8, 1), (1, 1, 1, 1)]
    assert trainer.best_epoch == 1 and history[1].val_loss > history[0].val_loss
    assert model.tn.ranks == (1, 8, 8, 1)  # the best epoch's bonds, put back with its weights
    assert measure(model, data.x_val, data.y_val, "mse")["loss"] == pytest.approx(history[0].val_loss, rel=1e-9)


def test_sweep_resume_gives_identical_weights(tmp_path):
    from test_trainer import assert_same_weights, run_interrupted_and_resumed

    def build():
        torch.manual_seed(2)
        return HybridMLP(16, hidden=64, out_features=1, rank=2, hidden_shape=(4, 4, 4)).double()

    for schedule in ("batch", "bond"):
        cfg = TrainConfig(epochs=3, batch_size=100, lr=1e-2, optimizer="sweep", progress=False, seed=3,
                          sweep=SweepConfig(max_rank=8, schedule=schedule))
        ckpt = tmp_path / f"{schedule}.safetensors"
        straight, resumed, history = run_interrupted_and_resumed(ckpt, regression_data(), build, cfg, stop_epoch=1,
                                                                 loss="mse")
        assert [h.epoch for h in history] == [1, 2, 3]
        assert_same_weights(straight, resumed)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_rank=0), "max_rank=0"), (dict(cutoff=1.0), "cutoff=1.0"), (dict(schedule="sweep"), "schedule='sweep'"),
    (dict(local_optimizer="lbfgs"), "local_optimizer='lbfgs'"), (dict(gradient="fd"), "gradient='fd'"),
    (dict(sites=3), "sites=3")])
def test_bad_sweep_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)


def test_sweep_needs_an_mpo_layer_and_matching_optimizer():
    from torchtn.models import FC2

    with pytest.raises(ValueError, match="at least one MPOLinear"):
        Trainer(FC2(64), TrainConfig(optimizer="sweep"))
    with pytest.raises(ValueError, match="optimizer='sweep'"):
        TrainConfig(optimizer="adamw", sweep=SweepConfig())


class _Twice(torch.nn.Module):
    """One MPO layer applied twice (shared weights), then a dense read-out: ``W (W x)``; or, with ``skip_odd``, a
    model that uses its MPO layer only on even batches (counted per training call)."""

    def __init__(self, skip_odd: bool = False) -> None:
        super().__init__()
        self.tn = MPOLinear(16, 16, 2, in_shape=(4, 4), out_shape=(4, 4), dtype=torch.float64)
        self.out = torch.nn.Linear(16, 1, dtype=torch.float64)
        self.skip_odd, self.calls = skip_odd, 0

    def forward(self, x):
        if self.skip_odd:
            self.calls += self.training
            return self.out(self.tn(x) if self.calls % 2 or not self.training else x)
        return self.out(self.tn(self.tn(x)))


def test_a_layer_used_twice_or_skipped_in_a_batch_is_named_not_half_trained():
    """The local gradient reads the layer's input and output gradient of this batch's forward pass: a layer called
    twice left only its second call there, one skipped in a batch left the previous batch's — both were used
    silently. With the whole network recomputed for each local gradient (autograd) a shared layer is exact."""
    data = regression_data()
    cfg = dict(epochs=1, batch_size=150, optimizer="sweep", progress=False)
    with pytest.raises(RuntimeError, match=r"layer 'tn' ran 2 times in this batch's forward pass, .*recompute=True"):
        Trainer(_Twice(), TrainConfig(**cfg, sweep=SweepConfig(max_rank=4)), loss="mse").fit(data)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        Trainer(_Twice(), TrainConfig(**cfg, sweep=SweepConfig(max_rank=4, recompute=True, gradient="manual")),
                loss="mse").fit(data)
    with pytest.raises(RuntimeError, match="layer 'tn' took no part in this batch's backward pass"):
        Trainer(_Twice(skip_odd=True), TrainConfig(**cfg, sweep=SweepConfig(max_rank=4)), loss="mse").fit(data)
    torch.manual_seed(0)
    model = _Twice()
    before = measure(model, data.x_test, data.y_test, "mse")["loss"]
    start = [c.clone() for c in model.tn.cores]
    Trainer(model, TrainConfig(**{**cfg, "epochs": 5, "lr": 1e-2}, sweep=SweepConfig(max_rank=4, recompute=True)),
            loss="mse").fit(data)
    assert measure(model, data.x_test, data.y_test, "mse")["loss"] < 0.5 * before
    assert model.tn.ranks != (1, 2, 1) or not all(torch.equal(a, b) for a, b in zip(start, model.tn.cores))


def test_a_frozen_mpo_layer_is_left_alone_by_the_sweep():
    """Sweeps trained (and re-ranked) an MPO layer whose cores the user had frozen, and left them trainable; a layer
    with every core frozen is now left as it is — as an optimizer leaves a frozen parameter — while the others are
    swept; a model with nothing left to sweep is refused in one line."""
    from torchtn.models import FC2

    data = load_digits()
    torch.manual_seed(0)
    model = FC2(64, hidden=64, layers="mpo", rank=4)
    model.fc1.requires_grad_(False)
    frozen, other = model.fc1.to_dense().clone(), model.fc2.to_dense().clone()
    Trainer(model, TrainConfig(epochs=1, optimizer="sweep", progress=False)).fit(data)
    assert torch.equal(model.fc1.to_dense(), frozen) and model.fc1.ranks == (1, 4, 4, 4, 1)
    assert not any(p.requires_grad for p in model.fc1.parameters())
    assert not torch.equal(model.fc2.to_dense(), other)
    model.fc2.requires_grad_(False)
    with pytest.raises(ValueError, match="MPOLinear layer of two or more cores that are not frozen"):
        Trainer(model, TrainConfig(epochs=1, optimizer="sweep", progress=False))
