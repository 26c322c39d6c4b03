import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def random_tt(in_shape, out_shape, rank, dtype=torch.float64, seed=0):
    """Random TT cores with every inner bond at ``min(rank, cap)``."""
    from torchtn.core import bond_caps

    gen = torch.Generator().manual_seed(seed)
    ranks = [1] + [min(rank, c) for c in bond_caps(in_shape, out_shape)] + [1]
    return [torch.randn(ranks[k], m, n, ranks[k + 1], generator=gen, dtype=dtype)
            for k, (m, n) in enumerate(zip(out_shape, in_shape))]


def unfolding(w, in_shape, out_shape, k):
    """Independent reference (numpy, not torchtn): the TT unfolding of ``W`` at bond ``k`` (0-based), sites ≤ k vs > k.

    ``W[i, j]`` with C-order multi-indices is reshaped to ``(m_1..m_d, n_1..n_d)``, its modes interleaved as
    ``(m_1, n_1, m_2, n_2, …)`` and split after site ``k``.
    """
    import math

    import numpy as np

    d = len(in_shape)
    t = np.asarray(w.detach().cpu().numpy()).reshape(*out_shape, *in_shape)
    t = t.transpose([i for s in range(d) for i in (s, d + s)])
    rows = math.prod(m * n for m, n in zip(out_shape[: k + 1], in_shape[: k + 1]))
    return torch.from_numpy(np.ascontiguousarray(t).reshape(rows, -1))


def entropy_reference(s):
    """``−Σ p ln p`` with ``p = s²/Σ s²`` over the nonzero values, in plain numpy."""
    import numpy as np

    p = np.asarray(s, dtype=np.float64) ** 2
    p = p[p > 1e-24 * p.sum()] / p.sum()
    return float(-(p * np.log(p)).sum())


def exact_tt_svd_error(w, in_shape, out_shape, rank):
    """Relative error of an exact (full-SVD, numpy) TT-SVD with every bond capped at ``rank`` — the TensorLy-style
    reference that an exact truncation must reach."""
    import numpy as np

    d = len(in_shape)
    a = w.detach().cpu().numpy().astype(np.float64)
    t = a.reshape(*out_shape, *in_shape).transpose([i for s in range(d) for i in (s, d + s)])
    sizes = [m * n for m, n in zip(out_shape, in_shape)]
    carry, r_prev, cores = t.reshape(sizes[0], -1), 1, []
    for k in range(d - 1):
        carry = carry.reshape(r_prev * sizes[k], -1)
        u, s, vh = np.linalg.svd(carry, full_matrices=False)
        r = min(rank, len(s))
        cores.append(u[:, :r].reshape(r_prev, sizes[k], r))
        carry, r_prev = s[:r, None] * vh[:r], r
    cores.append(carry.reshape(r_prev, sizes[-1], 1))
    full = cores[0]
    for c in cores[1:]:
        full = np.tensordot(full, c, axes=([-1], [0]))
    full = full.reshape([x for m, n in zip(out_shape, in_shape) for x in (m, n)])
    full = full.transpose([2 * s for s in range(d)] + [2 * s + 1 for s in range(d)]).reshape(a.shape)
    return float(np.linalg.norm(full - a) / np.linalg.norm(a))
