"""Tensor-train math core against exact dense linear algebra."""
import math

import pytest
import torch
from conftest import entropy_reference, exact_tt_svd_error, random_tt, unfolding
from hypothesis import given, settings
from hypothesis import strategies as st

from torchtn.core import (
    bond_caps,
    bond_spectra,
    entanglement_entropy,
    factorize,
    left_canonical,
    prime_factors,
    right_canonical,
    spectrum_entropy,
    suggest_shapes,
    truncated_svd,
    tt_num_params,
    tt_ranks,
    tt_round,
    tt_svd,
    tt_to_dense,
)

SHAPES = [((4, 7, 7, 4), (4, 4, 4, 4)), ((2, 3), (5, 2)), ((6,), (5,)), ((1, 2, 5, 1), (4, 4, 4, 4)), ((3, 1, 4), (1, 6, 2))]


def unfolding_svals(w, in_shape, out_shape, k):
    return torch.linalg.svdvals(unfolding(w, in_shape, out_shape, k))


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
def test_full_rank_tt_svd_is_exact(in_shape, out_shape):
    w = torch.randn(math.prod(out_shape), math.prod(in_shape), dtype=torch.float64)
    cores = tt_svd(w, in_shape, out_shape)
    assert torch.allclose(tt_to_dense(cores), w, atol=1e-10, rtol=0)
    assert all(c.shape[1:3] == (m, n) for c, m, n in zip(cores, out_shape, in_shape))
    assert tt_ranks(cores)[1:-1] == bond_caps(in_shape, out_shape)


def test_tt_to_dense_matches_the_defining_sum():
    cores = random_tt((2, 3), (3, 2), 2)
    w = tt_to_dense(cores)
    for i1, i2, j1, j2 in [(0, 0, 0, 0), (2, 1, 1, 2), (1, 0, 0, 1)]:
        direct = (cores[0][:, i1, j1, :] @ cores[1][:, i2, j2, :]).item()
        assert w[i1 * 2 + i2, j1 * 3 + j2].item() == pytest.approx(direct, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    modes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=2, max_size=4),
    eps=st.floats(0.01, 0.99),
    decay=st.floats(0.0, 3.0),
    seed=st.integers(0, 10_000),
)
def test_rel_tol_bound_holds(modes, eps, decay, seed):
    out_shape, in_shape = tuple(m for m, _ in modes), tuple(n for _, n in modes)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(math.prod(out_shape), math.prod(in_shape), generator=gen, dtype=torch.float64)
    w = w * torch.exp(-decay * torch.linspace(0, 1, w.shape[1], dtype=torch.float64))  # some spectral decay
    cores = tt_svd(w, in_shape, out_shape, rel_tol=eps)
    err = torch.linalg.norm(tt_to_dense(cores) - w) / torch.linalg.norm(w)
    assert err <= eps * (1 + 1e-9)
    rounded = tt_round(tt_svd(w, in_shape, out_shape), rel_tol=eps)
    assert torch.linalg.norm(tt_to_dense(rounded) - w) / torch.linalg.norm(w) <= eps * (1 + 1e-9)


def test_rel_tol_truncates_something_and_max_rank_wins():
    w = torch.randn(256, 784, dtype=torch.float64)
    loose = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), rel_tol=0.5)
    assert tt_num_params((4, 7, 7, 4), (4, 4, 4, 4), tt_ranks(loose)) < w.numel()
    both = tt_svd(w, (4, 7, 7, 4), (4, 4, 4, 4), rel_tol=0.5, max_rank=3)
    assert max(tt_ranks(both)) == 3


def test_max_rank_is_clipped_to_bond_caps():
    w = torch.randn(16, 16, dtype=torch.float64)
    cores = tt_svd(w, (4, 4), (4, 4), max_rank=1000)
    assert tt_ranks(cores) == (1, 16, 1)
    assert bond_caps((4, 7, 7, 4), (4, 4, 4, 4)) == (16, 448, 16)


def test_truncation_matches_eckart_young_for_two_cores():
    w = torch.randn(64, 48, dtype=torch.float64)
    cores = tt_svd(w, (6, 8), (8, 8), max_rank=5)
    s = unfolding_svals(w, (6, 8), (8, 8), 0)
    err = torch.linalg.norm(tt_to_dense(cores) - w)
    assert err.item() == pytest.approx(torch.linalg.norm(s[5:]).item(), rel=1e-10)


def test_randomized_svd_within_two_percent_of_exact():
    torch.manual_seed(1)
    n = 1024
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.exp(-torch.arange(n, dtype=torch.float64) / 60)  # slowly decaying spectrum: hard for sketches
    a = (u * s) @ v.T
    for rank in (16, 64):
        _, _, _, err_sq = truncated_svd(a, max_rank=rank)
        exact = torch.linalg.norm(s[rank:]).item()
        assert math.sqrt(err_sq) <= 1.02 * exact
        assert math.sqrt(err_sq) >= exact * (1 - 1e-9)  # cannot beat the optimum: the error is measured exactly


def test_randomized_error_is_exact_projection_error():
    a = torch.randn(600, 500, dtype=torch.float64)
    u, s, vh, err_sq = truncated_svd(a, max_rank=20)
    assert u.shape == (600, 20)
    assert torch.linalg.norm(a - (u * s) @ vh).item() ** 2 == pytest.approx(err_sq, rel=1e-9)
    with pytest.raises(ValueError, match=r"a has shape \(500,\): expected a matrix"):
        truncated_svd(a[0], max_rank=2)  # (it failed unpacking the shape)
    with pytest.raises(ValueError, match="max_rank=0 is not allowed"):
        truncated_svd(a, max_rank=0)  # (it returned empty factors, though at least rank 1 is promised)


def test_round_recovers_inflated_ranks_exactly():
    cores = random_tt((3, 4, 3), (2, 5, 2), 3)
    doubled = [torch.cat([c, c], 0) if k else c for k, c in enumerate(cores)]  # a sum W + W with doubled bonds
    doubled = [torch.cat([torch.cat([c, torch.zeros_like(c)], 3), torch.cat([torch.zeros_like(c), c], 3)], 0)
               if 0 < k < len(cores) - 1 else c for k, c in enumerate(cores)]
    doubled[0] = torch.cat([cores[0], cores[0]], 3)
    doubled[-1] = torch.cat([cores[-1], cores[-1]], 0)
    assert torch.allclose(tt_to_dense(doubled), 2 * tt_to_dense(cores), atol=1e-10)
    rounded = tt_round(doubled, rel_tol=1e-8)
    assert tt_ranks(rounded) == tt_ranks(cores)
    assert torch.allclose(tt_to_dense(rounded), 2 * tt_to_dense(cores), atol=1e-9)


def test_canonical_forms_are_orthogonal_and_preserve_the_matrix():
    cores = random_tt((4, 3, 5), (2, 6, 3), 4)
    w = tt_to_dense(cores)
    left = left_canonical(cores)
    for c in left[:-1]:
        q = c.reshape(-1, c.shape[3])
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=q.dtype), atol=1e-12)
    right = right_canonical(cores)
    for c in right[1:]:
        q = c.reshape(c.shape[0], -1)
        assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12)
    assert torch.allclose(tt_to_dense(left), w, atol=1e-10)
    assert torch.allclose(tt_to_dense(right), w, atol=1e-10)


def test_bond_spectra_equal_svd_of_unfoldings():
    in_shape, out_shape = (4, 3, 5), (2, 6, 3)
    cores = random_tt(in_shape, out_shape, 4)
    w = tt_to_dense(cores)
    for k, s in enumerate(bond_spectra(cores)):
        exact = unfolding_svals(w, in_shape, out_shape, k)[: len(s)]
        assert torch.allclose(s, exact, rtol=1e-10, atol=1e-10)


def test_entropy_of_product_is_zero_and_flat_spectrum_is_log_r():
    product = random_tt((3, 4), (2, 5), 1)
    assert entanglement_entropy(product).abs().max().item() < 1e-12
    r = 6
    q1, _ = torch.linalg.qr(torch.randn(12, r, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, r, dtype=torch.float64))
    flat = [q1.reshape(1, 4, 3, r), q2.T.reshape(r, 4, 5, 1)]  # r equal Schmidt values
    assert entanglement_entropy(flat).item() == pytest.approx(math.log(r), abs=1e-12)
    assert spectrum_entropy(torch.tensor([2.0, 0.0])).item() == 0.0


def test_factorize():
    assert factorize(784, 4) == (4, 7, 7, 4)
    assert factorize(4096, 4) == (8, 8, 8, 8)
    for n, d in [(11008, 4), (10, 4), (97, 3), (2 ** 20, 5), (1, 3)]:
        f = factorize(n, d)
        assert len(f) == d and math.prod(f) == n
    assert prime_factors(360) == [2, 2, 2, 3, 3, 5]
    assert suggest_shapes(256, 10) == ((4, 4, 4, 4), (1, 2, 5, 1))
    with pytest.raises(ValueError, match="n=0"):
        factorize(0, 2)


def test_param_count():
    assert tt_num_params((4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1)) == 32 * 4 + 56 * 16  # Gao et al.'s count


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rel_tol=0.0), "rel_tol=0.0"),
        (dict(rel_tol=1.5), "rel_tol=1.5"),
        (dict(max_rank=0), "max_rank=0"),
        (dict(max_rank=-2), "max_rank=-2"),
        (dict(max_rank=(2, 2, 2)), "one per inner bond"),
    ],
)
def test_tt_svd_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tt_svd(torch.randn(16, 16), (4, 4), (4, 4), **kwargs)


def test_tt_svd_bad_shapes():
    with pytest.raises(ValueError, match="describe a 16×15"):
        tt_svd(torch.randn(16, 16), (5, 3), (4, 4))
    with pytest.raises(ValueError, match="same length"):
        tt_svd(torch.randn(16, 16), (16,), (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        tt_svd(torch.randn(16), (4, 4), (4, 4))
    with pytest.raises(ValueError, match="outer bonds"):
        tt_to_dense([torch.randn(2, 2, 2, 1)])


def test_cores_that_do_not_form_a_tt_matrix_are_refused_naming_the_core():
    with pytest.raises(ValueError, match=r"cores\[1\] has shape \(2, 2, 2\): expected a 4-D tensor"):
        tt_to_dense([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2)])
    with pytest.raises(ValueError, match=r"cores\[1\] has shape list"):
        tt_to_dense([torch.randn(1, 2, 2, 2), [1.0]])
    with pytest.raises(ValueError, match=r"cores\[0\] ends in bond 2 but cores\[1\] starts with 3"):
        tt_to_dense([torch.randn(1, 2, 2, 2), torch.randn(3, 2, 2, 1)])
    with pytest.raises(ValueError, match="got an empty list"):
        tt_to_dense([])
    with pytest.raises(TypeError, match="matrix has dtype torch.int64: expected a floating-point tensor"):
        tt_svd(torch.ones(16, 16, dtype=torch.long), (4, 4), (4, 4))


def test_entropies_of_a_zero_matrix_and_of_a_single_core_are_zero_and_empty():
    from torchtn.core import entanglement_entropy

    zero = tt_svd(torch.zeros(16, 16), (4, 4), (4, 4))
    assert torch.equal(tt_to_dense(zero), torch.zeros(16, 16))
    assert torch.equal(entanglement_entropy(zero), torch.zeros(1, dtype=torch.float64))
    assert entanglement_entropy([torch.randn(1, 4, 4, 1)]).shape == (0,)


def test_bond_report_next_rank_error_is_exact():
    from torchtn.core import bond_report

    in_shape, out_shape = (3, 4), (2, 5)
    cores = random_tt(in_shape, out_shape, 3)
    w = tt_to_dense(cores)
    (info,) = bond_report(cores)
    truncated = tt_to_dense(tt_round(cores, max_rank=info.rank - 1))
    assert info.next_rank_error == pytest.approx((torch.linalg.norm(truncated - w) / torch.linalg.norm(w)).item(),
                                                 rel=1e-9)
    assert info.entropy == pytest.approx(entanglement_entropy(cores).item())


def test_budget_only_svd_is_randomized_and_keeps_the_bound(monkeypatch):
    import torchtn.core.svd as svd_module

    torch.manual_seed(2)
    n = 1024
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.exp(-torch.arange(n, dtype=torch.float64) / 15)
    a = (u * s) @ v.T
    budget = (0.05 * torch.linalg.norm(s)).item() ** 2
    exact_rank = svd_module.rank_for_tail(s, budget)

    def no_exact(_):
        raise AssertionError("the exact SVD should not be needed here")

    monkeypatch.setattr(svd_module, "_exact_svd", no_exact)
    uu, ss, vh, err_sq = svd_module.truncated_svd(a, tail_sq_budget=budget)
    assert err_sq <= budget * (1 + 1e-9)
    assert torch.linalg.norm(a - (uu * ss) @ vh).item() ** 2 == pytest.approx(err_sq, rel=1e-8)
    assert exact_rank <= len(ss) <= exact_rank + 2


@pytest.mark.parametrize("n,modes,rank", [(64, (4, 4, 4), 4), (64, (8, 8), 6), (256, (4, 4, 4, 4), 8)])
def test_rank_capped_tt_svd_of_small_matrices_is_exact(n, modes, rank):
    """Small unfoldings get an exact SVD: the error equals the exact (TensorLy-style, numpy) TT-SVD's to 1e-9."""
    gen = torch.Generator().manual_seed(n + rank)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    w = (u * torch.exp(-torch.arange(n, dtype=torch.float64) / 8)) @ v.T
    cores = tt_svd(w, modes, modes, max_rank=rank)
    err = (torch.linalg.norm(tt_to_dense(cores) - w) / torch.linalg.norm(w)).item()
    assert err == pytest.approx(exact_tt_svd_error(w, modes, modes, rank), rel=1e-9)


def test_entropy_reference_agrees():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert spectrum_entropy(s).item() == pytest.approx(entropy_reference(s.numpy()), abs=1e-14)
