"""Compression of trained models: ``tensorize`` (TT-SVD of every ``nn.Linear``), its report, the calibration
statistics of data-aware truncation, and the sequential refit of a calibrated model against the original."""
from .calibration import LayerStats, calibrate
from .refit import RefitReport, refit
from .tensorize import LayerReport, TensorizeReport, allocate_ranks, check_skip, tensorize

__all__ = ["tensorize", "TensorizeReport", "LayerReport", "allocate_ranks", "calibrate", "LayerStats", "check_skip",
           "refit", "RefitReport"]
