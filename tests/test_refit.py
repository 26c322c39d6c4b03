"""Sequential refit of calibrated two-core MPO layers (torchtn.compress.refit) against exact least squares."""
import math

import pytest
import torch
from torch import nn

import torchtn
from torchtn.compress.refit import refit


def _teacher(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40, bias=bias), nn.Tanh(), nn.Linear(40, 40, bias=bias), nn.Tanh(),
                         nn.Linear(40, 6, bias=bias)).double()


def _batches(seed: int, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64) / 3  # correlated inputs, a nonzero mean
    return [torch.randn(64, 24, generator=g, dtype=torch.float64) @ mix + 0.5 for _ in range(n)]


def _output_error(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((student(x) - teacher(x)).square().sum()) for x in batches)


def test_refit_lowers_every_layers_error_and_the_models_in_call_order():
    teacher, batches = _teacher(), _batches(0)
    stats = torchtn.calibrate(teacher, batches, output=lambda out, batch: out, probes=2)
    student, _ = torchtn.tensorize(teacher, rank=5, calibration=stats)
    held_out = _batches(1)
    before = _output_error(student, teacher, batches), _output_error(student, teacher, held_out)
    ranks = [student[i].ranks for i in (0, 2, 4)]
    report = refit(student, teacher, batches, calibration=stats)
    assert [r[0] for r in report.rows] == ["0", "2", "4"]  # the order the model calls them
    assert all(after <= b for _, _, b, after in report.rows)
    assert [student[i].ranks for i in (0, 2, 4)] == ranks  # same ranks, same parameter count
    after = _output_error(student, teacher, batches), _output_error(student, teacher, held_out)
    assert after[0] < 0.7 * before[0]
    assert after[1] < before[1]  # 512 rows for 40-dimensional inputs: it generalizes
    assert "output error before" in report.table()


@pytest.mark.parametrize("bias", [True, False])
def test_a_layer_whose_inputs_did_not_move_ends_at_the_eckart_young_optimum(bias):
    """The first layer sees the same inputs in both models: its refit error is the tail of the singular values of
    ``Rᵀ W L`` (input covariance ``L Lᵀ`` — centred when a bias can take the mean error, raw without one —, output
    sensitivity ``R Rᵀ``), relative to the output's size."""
    teacher, batches = _teacher(bias), _batches(0)
    stats = torchtn.calibrate(teacher, batches, output=lambda out, batch: out, probes=2)
    student, _ = torchtn.tensorize(teacher, rank=5, calibration=stats)
    report = refit(student, teacher, batches, calibration=stats)
    x = torch.cat(batches)
    mu = x.mean(0) if bias else torch.zeros(24, dtype=x.dtype)
    cov = (x - mu).T @ (x - mu) / len(x)
    p = stats["0"].output_gram / stats["0"].output_samples
    w = teacher[0].weight.detach()
    b = teacher[0].bias.detach() if bias else torch.zeros(40, dtype=x.dtype)
    lw = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * torch.eye(24, dtype=cov.dtype))
    rw = torch.linalg.cholesky(p + 1e-6 * p.diagonal().mean() * torch.eye(40, dtype=p.dtype))
    s = torch.linalg.svdvals(rw.T @ w @ lw)
    mean_out = w @ mu + b
    optimum = math.sqrt(float(s[5:].square().sum()) / float(s.square().sum() + mean_out @ p @ mean_out))
    assert report.rows[0][3] == pytest.approx(optimum, rel=1e-4)
    if bias:  # and the refit layer computes the rank-5 map with the mean error removed (the bias took it)
        with torch.no_grad():
            residual = teacher[0](x) - student[0](x)
        torch.testing.assert_close(residual.mean(0), torch.zeros(40, dtype=x.dtype), rtol=0, atol=1e-9)
    else:  # the bias-free fit is the best on the raw moments, where the centred one would have left the mean out
        assert student[0].bias is None and report.rows[0][3] <= report.rows[0][2]


def test_refit_refuses_what_it_cannot_work_on():
    teacher, batches = _teacher(), _batches(0)
    plain, _ = torchtn.tensorize(teacher, rank=3)  # balanced multi-core MPOs: not the two-core layout
    with pytest.raises(ValueError, match="no two-core MPOLinear"):
        refit(plain, teacher, batches)
    stats = torchtn.calibrate(teacher, batches)
    student, _ = torchtn.tensorize(teacher, rank=5, calibration=stats)
    with pytest.raises(ValueError, match="at least one batch"):
        refit(student, teacher, [])


def test_a_prior_pulls_toward_the_calibrated_fit_and_never_beats_the_unregularized_optimum():
    """``prior`` mixes in rows whose compressed input is the original's: the first layer (whose inputs did not move)
    is unchanged by it; every later layer ends no better on the real inputs than the unregularized refit, which is
    their optimum; prior 1 and negative priors are refused."""
    teacher, batches = _teacher(), _batches(0)
    stats = torchtn.calibrate(teacher, batches, output=lambda out, batch: out, probes=2)
    reports = {}
    for prior in (0.0, 0.5):
        student, _ = torchtn.tensorize(teacher, rank=5, calibration=stats)
        reports[prior] = refit(student, teacher, batches, calibration=stats, prior=prior).rows
    assert reports[0.5][0] == pytest.approx(reports[0.0][0])
    assert reports[0.5][1][2] == pytest.approx(reports[0.0][1][2])  # the same start
    assert reports[0.5][1][3] >= reports[0.0][1][3] - 1e-9
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="prior"):
            refit(student, teacher, batches, prior=bad)


def test_layers_reading_the_same_input_share_a_pass_and_a_chain_does_not():
    """Groups follow the input tensors themselves (query, key and value maps read one tensor): a chain of same-sized
    layers, whose freed inputs the allocator may hand out again at the same address, is never merged."""
    from torchtn.compress.refit import _call_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (nn.Linear(40, 40) for _ in range(4))
            self.chain = nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(40, 40), nn.Tanh())))

        def forward(self, x):
            return self.chain(self.out(self.q(x) * self.k(x) + self.v(x)))

    model = Block()
    names = ["q", "k", "v", "out"] + [f"chain.{2 * i}" for i in range(6)]
    for _ in range(3):
        assert _call_groups(model, names, torch.randn(64, 40)) == [["q", "k", "v"], ["out"]] + [[n] for n in names[4:]]
