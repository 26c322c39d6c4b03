"""Compression of trained models: ``tensorize`` (TT-SVD of every ``nn.Linear``) and its report."""
from .tensorize import LayerReport, TensorizeReport, allocate_ranks, tensorize

__all__ = ["tensorize", "TensorizeReport", "LayerReport", "allocate_ranks"]
