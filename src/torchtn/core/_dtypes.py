"""Half precision and the kernels that have none: float16 and bfloat16 go up to float32 for LAPACK (QR, SVD, LU) and
FFTs (no bfloat16 FFT; float16 FFTs only for power-of-two lengths on CUDA); the callers cast the results back."""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def half_to_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype those kernels take (float16 / bfloat16 -> float32; anything else unchanged)."""
    return x.float() if x.dtype in HALF else x
