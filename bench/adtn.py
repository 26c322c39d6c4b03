"""ADTN weight generation: the planner's merged passes against the gate-by-gate implementation (fresh process per row).

    python bench/adtn.py            # prints a Markdown section; bench/run.py includes it in docs/benchmarks.md

Target (issue 11): generating a 2^24-element weight (a 4096×4096 layer, depth 2), forward + backward, at least 6× faster
than applying the gates one by one with ``torch.matmul`` on views of the vector.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [{"Q": 18, "depth": 2}, {"Q": 24, "depth": 2}]


def worker(case: dict) -> dict:
    import torch

    from torchtn.core.adtn import adtn_generate, brick_layer_pairs, plan_adtn

    torch.manual_seed(0)
    Q, depth = case["Q"], case["depth"]
    gates = (torch.randn(depth, Q - 1, 4, 4) / 2).requires_grad_()
    plan = plan_adtn(Q, depth)

    def obvious(g):
        """What one writes first: every gate applied by torch.matmul on a (2^q, 4, 2^(Q−q−2)) view, autograd stores
        every intermediate."""
        x = torch.zeros(2**Q)
        x[0] = 1
        for m in range(depth):
            if m:
                x = torch.relu(x)
            k = 0
            for half in brick_layer_pairs(Q):
                for q in half:
                    x = torch.matmul(g[m, k], x.reshape(2**q, 4, 2 ** (Q - q - 2))).reshape(-1)
                    k += 1
        return x

    contestants = {"gate by gate (torch.matmul on views)": obvious,
                   f"torchtn (planner: {plan.group} gates per pass, recompute)":
                       lambda g: adtn_generate(g, group=plan.group, recompute=True)}
    with torch.no_grad():  # both compute the same tensor, or the comparison means nothing
        a, b = (fn(gates) for fn in contestants.values())
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max())):
            raise RuntimeError("the ADTN contestants disagree: the comparison would mean nothing")
        del a, b
    out = {"_plan": str(plan)}
    for name, fn in contestants.items():
        fwd, bwd = [], []
        for _ in range(3):
            gates.grad = None
            t0 = time.perf_counter()
            w = fn(gates)
            t1 = time.perf_counter()
            w.square().sum().backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            del w
        out[name] = {"forward_s": sorted(fwd)[1], "backward_s": sorted(bwd)[1]}
    return out


def section() -> str:
    lines, verdict = [], ""
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True,
                              check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        names = [k for k in res if not k.startswith("_")]
        base = res[names[0]]["forward_s"] + res[names[0]]["backward_s"]
        for k in names:
            total = res[k]["forward_s"] + res[k]["backward_s"]
            lines.append(f"| 2^{case['Q']}, depth {case['depth']} | {k} | {res[k]['forward_s']:.3f} | "
                         f"{res[k]['backward_s']:.3f} | {total:.3f} | {base / total:.1f}× |")
        if case["Q"] == 24:
            ours = res[names[1]]["forward_s"] + res[names[1]]["backward_s"]
            verdict = f"{base / ours:.1f}×, {'met' if base / ours >= 6 else 'NOT met'}"
    return ("## ADTN weight generation\n\nfp32, the median of 3 runs in one fresh process per case, forward then "
            "backward of `‖T‖²`. Target (issue 11): 2^24 entries at depth 2, forward + backward, ≥ 6× the gate-by-gate "
            f"implementation — **{verdict}**.\n\n| weights | implementation | forward s | backward s | total s | "
            "speed-up |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    else:
        print(section())
