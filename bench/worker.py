"""One benchmark case in a fresh process: every implementation side by side, JSON on stdout.

Called by ``bench/run.py``; not meant to be run by hand (but it can: ``python bench/worker.py '{"in": ...}'``).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch
from torch import nn

from torchtn import MPOLinear


def build(impl: str, case: dict) -> nn.Module | None:
    in_f, out_f, r = math.prod(case["in_shape"]), math.prod(case["out_shape"]), case["rank"]
    if impl == "dense":
        return nn.Linear(in_f, out_f)
    if impl == "torchtn":
        return MPOLinear(in_f, out_f, r, case["in_shape"], case["out_shape"])
    if impl == "tltorch":
        try:
            import tltorch
        except ImportError:
            return None
        return tltorch.FactorizedLinear(in_tensorized_features=tuple(case["in_shape"]),
                                        out_tensorized_features=tuple(case["out_shape"]), factorization="blocktt", rank=r)
    if impl == "torch-mpo":
        try:
            from torch_mpo import TTLinear
        except ImportError:
            return None
        return TTLinear(in_f, out_f, inp_modes=list(case["in_shape"]), out_modes=list(case["out_shape"]), tt_ranks=r)
    raise ValueError(impl)


def median_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def training_memory(layer: nn.Module, x: torch.Tensor) -> dict:
    """Bytes of parameters, gradients, Adam state (2× parameters) and tensors saved for backward in one step."""
    params = {p.data_ptr() for p in layer.parameters()}
    p_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    s_bytes = sum(saved.values())
    return {"params": p_bytes, "grads": p_bytes, "adam": 2 * p_bytes, "saved": s_bytes, "total": 4 * p_bytes + s_bytes}


def main() -> None:
    case = json.loads(sys.argv[1])
    torch.manual_seed(0)
    x = torch.randn(case["batch"], math.prod(case["in_shape"]))
    out = {}
    for impl in case["impls"]:
        layer = build(impl, case)
        if layer is None:
            continue
        layer.eval()
        with torch.no_grad():
            infer = median_ms(lambda: layer(x), case["reps"])
        layer.train()

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        train = median_ms(step, max(5, case["reps"] // 2))
        out[impl] = {"infer_ms": infer, "train_ms": train, "memory": training_memory(layer, x),
                     "params": sum(p.numel() for p in layer.parameters())}
        if impl == "torchtn":
            out[impl]["plan_infer"] = str(layer.plan(case["batch"], needs_grad=False))
            out[impl]["plan_train"] = str(layer.plan(case["batch"], needs_grad=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
