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

    Defaults were fitted by ``bench/calibrate.py`` on a 2-core x86 machine (torch 2.13, MKL, fp32): every candidate
    plan of the benchmark grid (784×256, 1024×1024, 4096×4096; ranks 4–32; batch 1–256; inference and training)
    timed side by side, then a random search for the constants whose picks come closest to the fastest measured
    candidate (geo-mean pick / best 1.05; the previous hand-fitted constants 1.10). Shapes of the effective rates:
    a GEMM runs at ``peak_flops`` times ``(side / fat) ** gemm_exp`` for each side shorter than ``fat``; a batched
    product (a stride-0 matrix times many slices) at ``batched`` times ``(cols / fat) ** cols_exp`` times
    ``(min(1, a/fat)·min(1, k/fat)) ** side_exp``; memory traffic at ``bandwidth``; every call costs ``call_overhead``
    and every inference step of a plan ``step_overhead`` more. A fresh tensor of
    at least ``fault_threshold`` bytes costs ``bytes / fault_bandwidth`` on top: glibc serves such allocations with a
    new ``mmap`` whose pages fault in on first touch (measured 0.23 ns/byte above 32 MiB, nothing below).
    """

    peak_flops: float = 1.1e11
    bandwidth: float = 4.66e10
    call_overhead: float = 7.6e-6
    fat: int = 48  # an operand side at least this long runs at full speed
    batched: float = 0.78  # a batched product (a stride-0 matrix times many slices) runs at most at this fraction
    gemm_exp: float = 0.44  # a GEMM side shorter than `fat` slows it by (side / fat) ** gemm_exp
    cols_exp: float = 0.59  # ... for batched products: the output's column count
    side_exp: float = 0.78  # ... for batched products: the matrix's two sides
    fault_threshold: int = 32 << 20
    fault_bandwidth: float = 4.3e9
    # Python and dispatch cost of one planned inference step beyond its product (views, the step's own call), as a
    # layer pays it when called among other work: measured 8–15 µs per extra step for 784×256 at batch 1 in
    # bench/run.py's randomly ordered rounds (4 µs when the same call repeats, which is what bench/calibrate.py
    # times). Not charged in training, where it was measured to pick slower plans.
    step_overhead: float = 1e-5

    def matmul_seconds(self, batch: int, a: int, k: int, cols: int, itemsize: int) -> float:
        """Time of ``(a, k) @ (batch, k, cols)`` (``cols == 1``: one GEMM ``(batch, k) @ (k, a)``)."""
        flops = 2.0 * batch * a * k * cols
        if flops == 0:  # an empty batch: nothing but the call
            return self.call_overhead
        if cols == 1:  # a plain GEMM with `batch` rows
            eff = math.prod([min(1.0, s / self.fat) ** self.gemm_exp for s in (batch, a, k)])
        else:
            eff = self.batched * min(1.0, cols / self.fat) ** self.cols_exp * (
                min(1.0, a / self.fat) * min(1.0, k / self.fat)) ** self.side_exp
        traffic = itemsize * (batch * k * cols + batch * a * cols + a * k)
        return max(flops / (self.peak_flops * eff), traffic / self.bandwidth) + self.call_overhead

    def alloc_seconds(self, numel: int, itemsize: int) -> float:
        """Time of faulting in a fresh tensor of ``numel`` elements (zero below ``fault_threshold`` bytes)."""
        size = numel * itemsize
        return size / self.fault_bandwidth if size >= self.fault_threshold else 0.0

    def copy_seconds(self, numel: int, itemsize: int) -> float:
        """Time of one permuting copy of ``numel`` elements (read + write)."""
        return 2 * itemsize * numel / self.bandwidth + self.call_overhead


DEFAULT_COST_MODEL = CostModel()
# A data-centre GPU: fast GEMMs, high bandwidth, kernel launches dominate small problems. Fitted by
# `bench/calibrate.py --device cuda` on an NVIDIA H100 80GB (torch 2.11, CUDA 13.0, fp32 without TF32; 2026-11-27):
# geo-mean (time of the model's pick) / (fastest measured candidate) over the 72 cells 1.072 with the earlier
# hand-set guess, 1.011 fitted. No page faults (PyTorch's caching allocator). Autotuning (``torchtn.set_autotune``)
# lets measurements decide on any other GPU.
CUDA_COST_MODEL = CostModel(peak_flops=1.24e14, bandwidth=4.0e12, call_overhead=2.78e-5, fat=48, batched=0.88,
                            gemm_exp=0.46, cols_exp=0.85, side_exp=0.88, step_overhead=1.34e-5,
                            fault_threshold=1 << 62)
_COST_MODELS: dict[str, CostModel] = {"cpu": DEFAULT_COST_MODEL, "cuda": CUDA_COST_MODEL}


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
