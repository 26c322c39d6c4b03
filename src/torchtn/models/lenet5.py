"""LeNet-5 as in Gao et al. 2020 (spec/mpo.md §4.3), with its three fully connected maps optionally as MPOs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_positive_int
from .blocks import adtn_config, linear

__all__ = ["LeNet5", "GAO_LENET5_MPO"]

# (in_features, out_features, in_shape, out_shape, bond) of the three MPO maps (spec §4.3): 2,860 weights in all
GAO_LENET5_MPO = ((400, 120, (2, 10, 10, 2), (2, 5, 6, 2), 4),
                  (120, 84, (2, 5, 6, 2), (2, 3, 7, 2), 4),
                  (84, 10, (2, 3, 7, 2), (1, 5, 2, 1), 2))


class LeNet5(nn.Module):
    """``(batch, in_channels, 28, 28) -> (batch, num_classes)``.

    conv 5×5×6 (``padding=2``, i.e. SAME) → ReLU → max-pool 2 → conv 5×5×16 (VALID) → ReLU → max-pool 2 → flatten
    400 → fc 400→120 → ReLU → fc 120→84 → ReLU → fc 84→10. ``layers="mpo"`` makes the three fully connected maps
    MPOs with Gao et al.'s modes and bonds ``ranks`` (default ``(4, 4, 2)``: 2,860 MPO weights against 58,920 dense
    ones); the convolutions stay dense, as in the paper's code. ``layers="adtn"``: the two big maps (400→120,
    120→84) ADTNs of ``adtn_depth`` brick layers (Qing et al.'s LeNet-5), the classifier dense.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, layers: str = "dense",
                 ranks: Sequence[int] = (4, 4, 2), adtn_depth: int = 2) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if len(ranks) != 3:
            raise ValueError(f"ranks={tuple(ranks)!r} is not allowed: expected one bond per MPO map (3)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        maps = list(GAO_LENET5_MPO)
        if num_classes != 10:
            maps[2] = (84, num_classes, None, None, ranks[2])
        kinds = [layers, layers, "dense" if layers == "adtn" else layers]
        self.fc1, self.fc2, self.fc3 = [linear(i, o, kind, r, in_shape=si, out_shape=so, depth=adtn_depth)
                                        for (i, o, si, so, _), r, kind in zip(maps, ranks, kinds)]
        self.act = nn.ReLU()
        self._layers, self._ranks, self._adtn_depth = layers, tuple(int(r) for r in ranks), adtn_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"LeNet5 expects 28×28 images, got {tuple(x.shape[-2:])}")
        h = self.features(x)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(h)))))

    def config(self) -> dict:
        return {"name": "lenet5", "in_channels": self.in_channels, "num_classes": self.num_classes,
                "layers": self._layers, "ranks": list(self._ranks), **adtn_config(self._layers, self._adtn_depth)}
