"""Helpers for walking and editing an ``nn.Module`` tree by qualified name (``"encoder.layer.0.fc"``)."""
from __future__ import annotations

from torch import nn

__all__ = ["parent_and_attr", "replace_submodule"]


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name``, and the attribute it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` is, in place."""
    parent, child = parent_and_attr(model, name)
    setattr(parent, child, new)
