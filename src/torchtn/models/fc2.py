"""FC2: the two-layer perceptron of Gao et al. (input → hidden → classes)."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive_int
from .blocks import adtn_config, linear

__all__ = ["FC2", "GAO_FC2_SHAPES"]

# Gao et al.'s modes for 784 → 256 → 10 (spec/mpo.md §4.3): (in_shape, out_shape) per layer
GAO_FC2_SHAPES = (((4, 7, 7, 4), (4, 4, 4, 4)), ((4, 4, 4, 4), (1, 10, 1, 1)))


class FC2(nn.Module):
    """``(batch, *image) -> (batch, num_classes)`` logits through ``fc1 → ReLU → fc2`` (inputs are flattened).

    ``layers="mpo"`` builds both layers as ``MPOLinear`` with every inner bond at ``rank`` (Gao et al.'s modes for
    784 → 256 → 10, balanced factorizations otherwise); ``"dense"`` builds ``nn.Linear``; ``"adtn"``: the big first
    map an ``ADTNLinear`` of ``adtn_depth`` brick layers (Qing et al.'s FC2), the classifier dense. ``tensorize``
    also turns a dense FC2 into an MPO one; :meth:`config` rebuilds the same skeleton for loading.
    """

    def __init__(self, in_features: int, hidden: int = 256, num_classes: int = 10, bias: bool = True,
                 layers: str = "dense", rank: int = 4, adtn_depth: int = 2) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.hidden = check_positive_int("hidden", hidden)
        self.num_classes = check_positive_int("num_classes", num_classes)
        gao = (in_features, hidden, num_classes) == (784, 256, 10)
        s1, s2 = GAO_FC2_SHAPES if gao else ((None, None), (None, None))
        self.fc1 = linear(self.in_features, self.hidden, layers, rank, in_shape=s1[0], out_shape=s1[1], bias=bias,
                          depth=adtn_depth)
        self.act = nn.ReLU()
        self.fc2 = linear(self.hidden, self.num_classes, "dense" if layers == "adtn" else layers, rank,
                          in_shape=s2[0], out_shape=s2[1], bias=bias)
        self._bias, self._layers, self._rank, self._adtn_depth = bias, layers, rank, adtn_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))

    def config(self) -> dict:
        return {"name": "fc2", "in_features": self.in_features, "hidden": self.hidden,
                "num_classes": self.num_classes, "bias": self._bias, "layers": self._layers, "rank": self._rank,
                **adtn_config(self._layers, self._adtn_depth)}
