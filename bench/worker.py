"""One benchmark cell in a fresh process: every contestant side by side, JSON on stdout.

Called by ``bench/run.py``; it can be run by hand: ``python bench/worker.py '{"in_shape": [8,8,8,8], ...}'``.
Contestants are timed in rounds, one call each per round, in a fresh random order every round, so that slow drifts
of the machine (frequency, other tenants, allocator state) and the call just before fall on every contestant alike.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchtn import MPOLinear
from torchtn.core import tt_to_dense


class RebuildLinear(nn.Module):
    """What users write first: rebuild ``W`` from the same cores every call, then ``F.linear``."""

    def __init__(self, layer: MPOLinear) -> None:
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in layer.cores])
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, tt_to_dense(list(self.cores)), self.bias)


def build(impl: str, case: dict) -> nn.Module | None:
    in_f, out_f, r = math.prod(case["in_shape"]), math.prod(case["out_shape"]), case["rank"]
    torch.manual_seed(0)
    if impl == "dense":
        return nn.Linear(in_f, out_f)
    if impl in ("torchtn", "torchtn-tuned", "rebuild-W"):
        layer = MPOLinear(in_f, out_f, r, case["in_shape"], case["out_shape"], autotune=impl == "torchtn-tuned")
        return RebuildLinear(layer) if impl == "rebuild-W" else layer
    if impl == "tltorch":
        try:
            import tltorch
        except ImportError:
            return None
        return tltorch.FactorizedLinear(in_tensorized_features=tuple(case["in_shape"]),
                                        out_tensorized_features=tuple(case["out_shape"]), factorization="blocktt",
                                        rank=r)
    if impl == "torch-mpo":
        try:
            from torch_mpo import TTLinear
        except ImportError:
            return None
        return TTLinear(in_f, out_f, inp_modes=list(case["in_shape"]), out_modes=list(case["out_shape"]), tt_ranks=r)
    raise ValueError(impl)


def infer_call(layer: nn.Module, x: torch.Tensor):
    """One timed inference call: forward under ``torch.no_grad()``."""
    def call():
        with torch.no_grad():
            layer(x)
    return call


def train_call(layer: nn.Module, x: torch.Tensor):
    """One timed training step: forward and backward of ``y.sum()`` with fresh gradients."""
    def call():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return call


def _sync() -> None:
    """Wait for queued GPU work, so a call's time is its whole time (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def rounds(fns: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per contestant over ``reps`` rounds, one call per contestant per round (GPU work included: the
    device is synchronized before and after every call).

    Each round runs the contestants in a fresh random order (seeded): a fixed or merely rotated order would give each
    contestant the same predecessor every time, and what runs just before a call (its cache footprint, its
    allocations) changes that call's time.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        order = names[:]
        shuffle(order)
        for n in order:
            _sync()
            t0 = time.perf_counter()
            fns[n]()
            _sync()
            times[n].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(t) for n, t in times.items()}


def infer_and_train(layers: dict, x: torch.Tensor, infer_reps: int, train_reps: int,
                    warmup: int = 3) -> dict[str, dict]:
    """``{name: {"infer_ms", "train_ms", "params"}}``: every layer timed side by side in eval, then in training,
    after ``warmup`` untimed rounds each."""
    out = {}
    for layer in layers.values():
        layer.eval()
    for name, ms in rounds({k: infer_call(v, x) for k, v in layers.items()}, infer_reps, warmup).items():
        out[name] = {"infer_ms": ms, "params": sum(p.numel() for p in layers[name].parameters())}
    for layer in layers.values():
        layer.train()
    for name, ms in rounds({k: train_call(v, x) for k, v in layers.items()}, train_reps, warmup).items():
        out[name]["train_ms"] = ms
    return out


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
    return {"params": p_bytes, "saved": s_bytes, "total": 4 * p_bytes + s_bytes}


def gemm_rate(device: str = "cpu") -> float:
    """FLOP/s of a large fp32 GEMM on this device, now (the roofline's rate; 2048³ on a CPU, 8192³ on a GPU)."""
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = min(rounds({"g": lambda: a @ b}, 5, 2).values())
    return 2 * n**3 / (best / 1e3)


def optimal_flops(case: dict) -> float:
    """FLOPs of ``x Wᵀ`` over the cores in opt_einsum's ``optimal`` order (its own count), or nan without it."""
    try:
        import opt_einsum
    except ImportError:
        return float("nan")
    d = len(case["in_shape"])
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ns, ms, rs = [next(letters) for _ in range(d)], [next(letters) for _ in range(d)], [next(letters) for _ in range(d + 1)]
    batch = next(letters)
    ranks = [1] + [c.shape[3] for c in MPOLinear(math.prod(case["in_shape"]), math.prod(case["out_shape"]),
                                                 case["rank"], case["in_shape"], case["out_shape"]).cores]
    terms = [batch + "".join(ns)] + [rs[k] + ms[k] + ns[k] + rs[k + 1] for k in range(d)]
    expr = ",".join(terms) + "->" + batch + "".join(ms)
    shapes = [(case["batch"], *case["in_shape"])] + [(ranks[k], case["out_shape"][k], case["in_shape"][k], ranks[k + 1])
                                                     for k in range(d)]
    _, info = opt_einsum.contract_path(expr, *shapes, shapes=True, optimize="optimal")
    return float(info.opt_cost)


def main() -> None:
    case = json.loads(sys.argv[1])
    device = case.get("device", "cpu")
    if case.get("cost_model"):  # a fitted model for this device type (bench/calibrate.py)
        from torchtn.core.contraction import CostModel, set_cost_model

        set_cost_model(CostModel(**case["cost_model"]), torch.device(device).type)
    torch.manual_seed(0)
    x = torch.randn(case["batch"], math.prod(case["in_shape"]), device=device)
    layers = {impl: build(impl, case) for impl in case["impls"]}
    layers = {k: v.to(device) for k, v in layers.items() if v is not None}
    out: dict = {impl: {} for impl in layers}

    for layer in layers.values():
        layer.eval()
    with torch.no_grad():  # every contestant maps the same shapes; rebuild-W runs on torchtn's very cores: same outputs
        if "torchtn" in layers and "rebuild-W" in layers:
            for mine, theirs in zip(layers["rebuild-W"].cores, layers["torchtn"].cores):
                mine.copy_(theirs)
            layers["rebuild-W"].bias.copy_(layers["torchtn"].bias)
        y = {impl: layer(x) for impl, layer in layers.items()}
    if len({tuple(v.shape) for v in y.values()}) != 1:
        raise RuntimeError(f"the contestants' outputs differ in shape: { {k: tuple(v.shape) for k, v in y.items()} }")
    if "torchtn" in y and "rebuild-W" in y and not torch.allclose(y["torchtn"], y["rebuild-W"], rtol=1e-4, atol=1e-5):
        raise RuntimeError("torchtn and rebuild-W disagree on the same cores: the comparison would mean nothing")
    del y
    for impl, ms in rounds({k: infer_call(v, x) for k, v in layers.items()}, case["reps"]).items():
        out[impl]["infer_ms"] = ms
    for layer in layers.values():
        layer.train()
    for impl, ms in rounds({k: train_call(v, x) for k, v in layers.items()}, max(5, case["reps"] // 2)).items():
        out[impl]["train_ms"] = ms
    for impl, layer in layers.items():
        out[impl]["memory"] = training_memory(layer, x)
        out[impl]["params"] = sum(p.numel() for p in layer.parameters())
    for name in ("torchtn", "torchtn-tuned"):
        tn = layers.get(name)
        if tn is not None:
            out[name]["plan_infer"] = str(tn.plan(case["batch"], needs_grad=False))
            out[name]["plan_train"] = str(tn.plan(case["batch"], needs_grad=True))
    out["_machine"] = {"gemm_flops": gemm_rate(device), "optimal_flops": optimal_flops(case),
                       "opt_einsum": torch.backends.opt_einsum.is_available()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
