"""Calibration statistics for data-aware compression: what each layer sees when the model runs on sample data.

``calibrate(model, batches)`` runs the model (eval mode) and records, for every ``nn.Linear``, the Gram matrix
``Σ x xᵀ`` of its inputs and, for every ``nn.Embedding``, how often each row was looked up; with ``output=`` also,
for both, the Gram matrix ``Σ g gᵀ`` of the gradients that random projections of the model's output send back to
the layer's outputs (how much each direction of the layer's output matters to the model's). ``tensorize(...,
calibration=stats)`` then truncates those layers in the norm of their output error on that data — of the model's
output error, with the gradients (:class:`~torchtn.core.weighting.Weighting`) — instead of the weights' Frobenius
norm.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._modules import unwrapped
from ..core.weighting import Weighting

__all__ = ["LayerStats", "calibrate", "row_counts", "sensitive"]


@dataclass
class LayerStats:
    """What one layer saw: ``input_gram`` ``(in_features, in_features)`` float64 (``nn.Linear``) or ``row_counts``
    ``(num_embeddings,)`` float64 (``nn.Embedding``); ``samples``: input rows / ids seen. With output sensitivity:
    ``output_gram`` ``(out, out)`` (``embedding_dim`` for a table) float64, the sum of ``g gᵀ`` over
    ``output_samples`` output rows and random output projections."""

    input_gram: torch.Tensor | None = None
    row_counts: torch.Tensor | None = None
    samples: int = 0
    output_gram: torch.Tensor | None = None
    output_samples: int = 0

    def weighting(self) -> Weighting:
        """The norm these statistics define (see :meth:`Weighting.from_stats`), in units of one sample's error:
        sums are divided by their sample counts, so layers calibrated on the same data compare in absolute terms."""
        mean = None if self.input_gram is None else self.input_gram / max(self.samples, 1)
        out = None if self.output_gram is None else self.output_gram / max(self.output_samples, 1)
        return Weighting.from_stats(input_gram=mean, row_counts=self.row_counts, output_gram=out)


def sensitive(stats: Mapping[str, LayerStats]) -> bool:
    """Whether every layer of ``stats`` carries output sensitivity (``calibrate(..., output=)``): its weighted
    errors are then all the model output's, comparable across layers in absolute terms."""
    return bool(stats) and all(s.output_gram is not None for s in stats.values())


def row_counts(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """How often each of ``num_rows`` rows is looked up by ``ids`` (any shape): ``(num_rows,)`` float64."""
    return torch.bincount(ids.reshape(-1), minlength=num_rows).double()


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _sensitivity(model: nn.Module, batches: list, output: Callable[[Any, Any], torch.Tensor], probes: int,
                 seed: int, stats: dict[str, LayerStats]) -> None:
    """Add every calibrated layer's output-gradient Gram to ``stats``: per batch and probe, ``y = output(model(b),
    b)`` ``(batch, k)`` is projected on a fresh Gaussian direction per sample, ``s = Σ_b ⟨u_b, y_b⟩``, and the
    gradients ``g = ∂s/∂(layer output)`` accumulate ``Σ g gᵀ`` — whose expectation over ``u`` is ``Jᵀ J``, ``J`` the
    Jacobian of the sample's output with respect to the layer's output. Parameters' ``.grad`` are not touched."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda _m, _a, out, name=name: seen.append((name, out)))
               for name, module in model.named_modules() if name in stats]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p, _ in flags:  # every layer output must be on the graph (frozen models too)
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(probes):
                for batch in batches:
                    seen.clear()
                    y = output(_run(model, batch), batch)
                    if not isinstance(y, torch.Tensor) or y.dim() != 2:
                        raise ValueError(f"output= must return a (batch, k) tensor, got "
                                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
                    u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
                    grads = torch.autograd.grad((y * u).sum(), [t for _, t in seen], allow_unused=True)
                    for (name, t), g in zip(seen, grads):
                        s = stats[name]
                        rows = t.detach().reshape(-1, t.shape[-1])
                        if s.output_gram is None:
                            s.output_gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                        device=rows.device)
                        if g is not None:
                            g = g.detach().reshape(-1, g.shape[-1]).double()
                            s.output_gram.addmm_(g.T, g)
                        s.output_samples += rows.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def calibrate(model: nn.Module, batches: Iterable[Any] | Callable[[], Any], *,
              output: Callable[[Any, Any], torch.Tensor] | None = None, probes: int = 4,
              seed: int = 0) -> dict[str, LayerStats]:
    """Statistics of every ``nn.Linear`` and ``nn.Embedding`` of ``model`` on ``batches``, by module name.

    ``batches``: an iterable of inputs, each passed as ``model(b)``, ``model(*b)`` (tuple/list) or ``model(**b)``
    (dict); or a callable that runs the model itself (e.g. a tokenizing encoder loop). Runs without gradients in eval
    mode (the model's mode is restored). A layer the data never reached is absent from the result.

    ``output(model_output, batch) -> (batch, k)``: what the model is for (e.g. normalized sentence embeddings,
    logits); then every layer also records how much each direction of its output moves that quantity (see
    :class:`LayerStats`), from ``probes`` random projections per batch (``seed``: their generator; each probe costs a
    forward and backward pass over ``batches``, which must then be an iterable). A layer whose output never reaches
    ``output`` gets a zero output Gram: it does not matter there, and a ratio budget will spend nothing on it.
    A compiled (``torch.compile``) or DDP-wrapped model is calibrated as the model it wraps (its layers' own names,
    run eagerly).
    """
    model = unwrapped(model)
    if output is not None:
        if callable(batches) and not isinstance(batches, nn.Module):
            raise ValueError("calibrate(output=...) needs batches as an iterable of inputs, not a callable")
        if not (isinstance(probes, int) and probes >= 1):
            raise ValueError(f"probes={probes!r} is not allowed: expected an int >= 1 (random output directions)")
        batches = list(batches)
    stats: dict[str, LayerStats] = {}

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if args[0].shape[-1:] != (module.in_features,):  # the layer itself says what is wrong with its input
                return
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
        for h in handles:  # the statistics of the inputs are complete
            h.remove()
        if output is not None and stats:
            _sensitivity(model, batches, output, probes, seed, stats)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("calibration saw no nn.Linear or nn.Embedding input: did the batches run the model?")
    return stats
