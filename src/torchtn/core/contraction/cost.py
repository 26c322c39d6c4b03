"""Cost models: a rough timing model of one kind of device, used to price contraction plans.

One model per device type (``"cpu"``, ``"cuda"``, …), replaceable with :func:`set_cost_model`; a layer or a call can
also be given its own. Only ratios between plans matter, so the constants need not be exact — and with autotuning on
(:mod:`.autotune`) the model only shortlists candidates that are then timed on the real device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "get_cost_model", "set_cost_model"]


@dataclass(frozen=True)
class CostModel:
    """Timing model of matmuls on one device.

    Defaults were fitted to matmul timings on a 2-core x86 machine (torch 2.13, MKL, fp32): ~190 GFLOP/s for fat
    matmuls, ~25 GFLOP/s for batched matmuls whose output has 8 columns (and fat batched products ~25% slower than
    one GEMM of the same FLOPs), ~15 GB/s effective bandwidth, ~5 µs per call.
    """

    peak_flops: float = 1.9e11
    bandwidth: float = 1.5e10
    call_overhead: float = 5e-6
    fat: int = 64  # an operand side at least this long runs at full speed
    batched: float = 0.75  # a batched product (a stride-0 matrix times many slices) runs at most at this fraction

    def matmul_seconds(self, batch: int, a: int, k: int, cols: int, itemsize: int) -> float:
        """Time of ``(a, k) @ (batch, k, cols)`` (``cols == 1``: one GEMM ``(batch, k) @ (k, a)``)."""
        flops = 2.0 * batch * a * k * cols
        if cols == 1:  # a plain GEMM with `batch` rows
            eff = math.prod([min(1.0, s / self.fat) ** 0.5 for s in (batch, a, k)])
        else:
            eff = self.batched * min(1.0, cols / self.fat) ** 0.9 * min(1.0, a / self.fat) ** 0.3 * min(
                1.0, k / self.fat) ** 0.3
        traffic = itemsize * (batch * k * cols + batch * a * cols + a * k)
        return max(flops / (self.peak_flops * eff), traffic / self.bandwidth) + self.call_overhead

    def copy_seconds(self, numel: int, itemsize: int) -> float:
        """Time of one permuting copy of ``numel`` elements (read + write)."""
        return 2 * itemsize * numel / self.bandwidth + self.call_overhead


DEFAULT_COST_MODEL = CostModel()
# A data-centre GPU: fast GEMMs, high bandwidth, kernel launches dominate small problems. A first guess to shortlist
# candidates; turn autotuning on (``torchtn.set_autotune(True)``) to let measurements decide.
_COST_MODELS: dict[str, CostModel] = {"cpu": DEFAULT_COST_MODEL,
                                      "cuda": CostModel(peak_flops=4e13, bandwidth=2e12, call_overhead=8e-6, fat=128)}


def get_cost_model(device: torch.device | str | None = None) -> CostModel:
    """The cost model in use for ``device``'s type (the CPU model for unknown types)."""
    kind = torch.device(device).type if device is not None else "cpu"
    return _COST_MODELS.get(kind, DEFAULT_COST_MODEL)


def set_cost_model(model: CostModel, device_type: str = "cpu") -> None:
    """Use ``model`` to price plans on devices of ``device_type`` from now on (cached plans are dropped)."""
    if not isinstance(model, CostModel):
        raise TypeError(f"model must be a CostModel, got {type(model).__name__}")
    if not isinstance(device_type, str) or not device_type:
        raise ValueError(f"device_type={device_type!r} is not allowed: expected a device type such as 'cpu' or 'cuda'")
    _COST_MODELS[device_type] = model
    from .planner import clear_plan_cache

    clear_plan_cache()
