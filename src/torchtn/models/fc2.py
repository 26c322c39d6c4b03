"""FC2: the two-layer perceptron of Gao et al. (input → hidden → classes)."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive_int

__all__ = ["FC2"]


class FC2(nn.Module):
    """``(batch, in_features) -> (batch, num_classes)`` logits through ``fc1 → ReLU → fc2``.

    ``tensorize`` turns ``fc1``/``fc2`` into ``MPOLinear``; :meth:`config` rebuilds the dense skeleton for loading.
    """

    def __init__(self, in_features: int, hidden: int = 256, num_classes: int = 10, bias: bool = True) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.hidden = check_positive_int("hidden", hidden)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.fc1 = nn.Linear(self.in_features, self.hidden, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(self.hidden, self.num_classes, bias=bias)
        self._bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))

    def config(self) -> dict:
        return {"name": "fc2", "in_features": self.in_features, "hidden": self.hidden,
                "num_classes": self.num_classes, "bias": self._bias}
