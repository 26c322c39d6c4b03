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
