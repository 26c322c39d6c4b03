"""Compression of trained models: ``tensorize`` (TT-SVD of every ``nn.Linear``), its report, and the calibration
statistics of data-aware truncation."""
from .calibration import LayerStats, calibrate
from .tensorize import LayerReport, TensorizeReport, allocate_ranks, check_skip, tensorize

__all__ = ["tensorize", "TensorizeReport", "LayerReport", "allocate_ranks", "calibrate", "LayerStats", "check_skip"]
