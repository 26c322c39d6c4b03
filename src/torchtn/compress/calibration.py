"""Calibration statistics for data-aware compression: what each layer sees when the model runs on sample data.

``calibrate(model, batches)`` runs the model (no gradients, eval mode) and records, for every ``nn.Linear``, the Gram
matrix ``Σ x xᵀ`` of its inputs and, for every ``nn.Embedding``, how often each row was looked up. ``tensorize(...,
calibration=stats)`` then truncates those layers in the norm of their output error on that data
(:class:`~torchtn.core.weighting.Weighting`) instead of the weights' Frobenius norm.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.weighting import Weighting

__all__ = ["LayerStats", "calibrate", "row_counts"]


@dataclass
class LayerStats:
    """What one layer saw: ``input_gram`` ``(in_features, in_features)`` float64 (``nn.Linear``) or ``row_counts``
    ``(num_embeddings,)`` float64 (``nn.Embedding``); ``samples``: input rows / ids seen."""

    input_gram: torch.Tensor | None = None
    row_counts: torch.Tensor | None = None
    samples: int = 0

    def weighting(self) -> Weighting:
        """The norm these statistics define (see :meth:`Weighting.from_stats`)."""
        return Weighting.from_stats(input_gram=self.input_gram, row_counts=self.row_counts)


def row_counts(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """How often each of ``num_rows`` rows is looked up by ``ids`` (any shape): ``(num_rows,)`` float64."""
    return torch.bincount(ids.reshape(-1), minlength=num_rows).double()


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable[Any] | Callable[[], Any]) -> dict[str, LayerStats]:
    """Statistics of every ``nn.Linear`` and ``nn.Embedding`` of ``model`` on ``batches``, by module name.

    ``batches``: an iterable of inputs, each passed as ``model(b)``, ``model(*b)`` (tuple/list) or ``model(**b)``
    (dict); or a callable that runs the model itself (e.g. a tokenizing encoder loop). Runs without gradients in eval
    mode (the model's mode is restored). A layer the data never reached is absent from the result.
    """
    stats: dict[str, LayerStats] = {}

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, module.in_features).double()
            s = stats.setdefault(name, LayerStats(input_gram=torch.zeros(module.in_features, module.in_features,
                                                                          dtype=torch.float64, device=x.device)))
            s.input_gram.addmm_(x.T, x)
            s.samples += x.shape[0]
        return hook

    def embedding_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            ids = args[0].detach().reshape(-1)
            s = stats.setdefault(name, LayerStats(row_counts=torch.zeros(module.num_embeddings, dtype=torch.float64,
                                                                         device=ids.device)))
            s.row_counts += row_counts(ids, module.num_embeddings)
            s.samples += ids.numel()
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(name)))
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(embedding_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if callable(batches) and not isinstance(batches, nn.Module):
                batches()
            else:
                for batch in batches:
                    _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("calibration saw no nn.Linear or nn.Embedding input: did the batches run the model?")
    return stats
