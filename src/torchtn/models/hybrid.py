"""The hybrid tensor network of Jahromi & Orús (spec/vtnn.md §1.1): dense input layer → MPO hidden layer → dense head."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_positive_int
from .blocks import adtn_config, linear

__all__ = ["HybridMLP"]


class HybridMLP(nn.Module):
    """``(batch, *input) -> (batch, out_features)`` through ``dense → ReLU → hidden → ReLU → dense`` (inputs flattened).

    The middle ``hidden × hidden`` map is an ``MPOLinear`` with every inner bond at ``rank`` over ``hidden_shape``
    modes (default: a balanced factorization, e.g. 64 = 4·4·4, 256 = 4·4·4·4) when ``layers="mpo"``, or an
    ``nn.Linear`` (``"dense"``: the baseline with the same outer layers), or an ``ADTNLinear`` of ``adtn_depth``
    brick layers (``"adtn"``). This is the model sweep training
    (``optimizer="sweep"``) was made for: the sweep trains the MPO, AdamW the dense layers. ``out_features`` is the
    number of classes (classification) or of regression targets.
    """

    def __init__(self, in_features: int, hidden: int = 64, out_features: int = 10, layers: str = "mpo",
                 rank: int = 4, hidden_shape: Sequence[int] | None = None, adtn_depth: int = 2) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.hidden = check_positive_int("hidden", hidden)
        self.out_features = check_positive_int("out_features", out_features)
        shape = None if hidden_shape is None else tuple(int(v) for v in hidden_shape)
        self.input = nn.Linear(self.in_features, self.hidden)
        self.tn = linear(self.hidden, self.hidden, layers, rank, in_shape=shape, out_shape=shape, depth=adtn_depth)
        self.head = nn.Linear(self.hidden, self.out_features)
        self.act = nn.ReLU()
        self._layers, self._rank, self._shape, self._adtn_depth = layers, rank, shape, adtn_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.tn(self.act(self.input(x.flatten(1))))))

    def config(self) -> dict:
        return {"name": "hybrid", "in_features": self.in_features, "hidden": self.hidden,
                "out_features": self.out_features, "layers": self._layers, "rank": self._rank,
                "hidden_shape": None if self._shape is None else list(self._shape),
                **adtn_config(self._layers, self._adtn_depth)}
