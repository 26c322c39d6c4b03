"""Helpers for walking and editing an ``nn.Module`` tree by qualified name (``"encoder.layer.0.fc"``)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["parent_and_attr", "replace_submodule", "holding"]


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name``, and the attribute it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` is, in place."""
    parent, child = parent_and_attr(model, name)
    setattr(parent, child, new)


def holding(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``module`` (a fresh dense layer of the right geometry) with ``weight`` and ``bias`` copied into its own
    (``bias=None``: its bias is left alone; a layer built without one has none)."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module
