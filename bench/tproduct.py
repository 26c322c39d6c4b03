"""The t-linear layer (⋆M product) against the obvious implementation and against dense layers (fresh process per case).

    python bench/tproduct.py        # prints a Markdown section; bench/run.py includes it in docs/benchmarks.md

Target (issue 7): the batched form (one batched matmul over all slices in the transform domain) at least as fast as
the dense layer with the same number of parameters.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [  # features in → out, tubes, batch
    {"fin": 28, "fout": 28, "n": 28, "batch": 32},
    {"fin": 28, "fout": 28, "n": 28, "batch": 256},
    {"fin": 96, "fout": 96, "n": 32, "batch": 32},
]


def worker(case: dict) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from worker import infer_and_train

    from torchtn.core.mprod import dct_matrix
    from torchtn.layers import TLinear

    torch.manual_seed(0)
    fin, fout, n, b = case["fin"], case["fout"], case["n"], case["batch"]
    x = torch.randn(b, fin, n)

    class LoopTLinear(nn.Module):
        """The obvious implementation: dense n × n transform, a Python loop over the frontal slices, inverse."""

        def __init__(self, layer: TLinear) -> None:
            super().__init__()
            self.weight = nn.Parameter(layer.weight.detach().clone())
            self.bias = nn.Parameter(layer.bias.detach().clone())
            self.register_buffer("M", dct_matrix(n, torch.float32))

        def forward(self, x):
            X = x.transpose(0, 1) @ self.M.T  # (in, batch, n)
            W = self.weight @ self.M.T
            Y = torch.stack([W[:, :, k] @ X[:, :, k] for k in range(n)], dim=-1)
            return (Y @ self.M + self.bias).transpose(0, 1)

    class Flat(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x.flatten(1))

    ours = TLinear(fin, fout, n)
    params = ours.weight.numel() + ours.bias.numel()
    layers = {"t-linear (torchtn, batched)": ours, "t-linear (slice loop)": LoopTLinear(ours),
              f"dense same sizes ({fin * n}→{fout * n})": Flat(nn.Linear(fin * n, fout * n)),
              f"dense same parameters ({fin * n}→{max(1, round(params / (fin * n + 1)))})":
                  Flat(nn.Linear(fin * n, max(1, round(params / (fin * n + 1)))))}
    with torch.no_grad():  # the two t-linear implementations compute the same map
        ref = layers["t-linear (slice loop)"](x)
        if not torch.allclose(ours(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
            raise RuntimeError("the t-linear forms disagree: the comparison would mean nothing")
    # sub-millisecond calls: a fresh process runs every contestant ~3× slower for its first ~20 rounds (measured:
    # allocator and thread-pool warm-up), so these cells warm up longer than the grid's
    return {"_params": params, **infer_and_train(layers, x, 40, 20, warmup=25)}


def forward_flops(name: str, case: dict, params: int) -> int:
    """Forward FLOPs (2 × multiply-adds) of a contestant with ``params`` parameters: the t-linear layers multiply the
    input by the n × n transform, the slices by the weight's and the result by the inverse transform (the loop also
    transforms the weight every call); a dense layer ``fin·n → out`` is one GEMM (``out`` from its parameter count,
    ``(fin·n + 1)·out``)."""
    fin, fout, n, b = case["fin"], case["fout"], case["n"], case["batch"]
    if name.startswith("t-linear"):
        weight = 2 * fout * fin * n * n if "loop" in name else 0
        return 2 * b * n * (fin * n + fin * fout + fout * n) + weight
    out, rest = divmod(params, fin * n + 1)
    assert rest == 0, f"{name}: {params} parameters is not a dense layer with {fin * n} inputs and a bias"
    return 2 * b * fin * n * out


def section() -> str:
    lines, verdicts, flop_ratios, faster = [], [], [], []
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True,
                              check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        names = [k for k in res if not k.startswith("_")]
        ours = res["t-linear (torchtn, batched)"]
        same_params = next(k for k in names if k.startswith("dense same parameters"))
        flops = {k: forward_flops(k, case, res[k]["params"]) for k in names}
        for k in names:
            lines.append(f"| {case['fin']}→{case['fout']} × {case['n']} tubes, B{case['batch']} | {k} | "
                         f"{res[k]['params']:,} | {flops[k] / 1e6:.2f} | {res[k]['infer_ms']:.3f} | "
                         f"{res[k]['train_ms']:.3f} |")
        flop_ratios.append(flops["t-linear (torchtn, batched)"] / flops[same_params])
        same_sizes = next(k for k in names if k.startswith("dense same sizes"))
        faster.append(all(ours[t] < res[same_sizes][t] for t in ("infer_ms", "train_ms")))
        verdicts.append((ours["infer_ms"] <= res[same_params]["infer_ms"], ours["train_ms"] <=
                         res[same_params]["train_ms"], f"{case['fin']}×{case['n']} B{case['batch']}",
                         ours["infer_ms"] / res[same_params]["infer_ms"],
                         ours["train_ms"] / res[same_params]["train_ms"]))
    summary = "; ".join(f"{label}: {fwd:.2f}× forward, {trn:.2f}× training" for _, _, label, fwd, trn in verdicts)
    met = all(a and b for a, b, *_ in verdicts)
    return ("## Star-M t-linear layer against the obvious implementation and dense layers\n\nfp32, 25 untimed warm-up rounds, then the median of randomly "
            "ordered rounds in one fresh process per case; M = orthonormal DCT. *Slice loop*: the transform as a "
            "dense n × n matmul, a Python loop over the frontal slices, the inverse. Target (issue 7): the batched "
            "form at least as fast as the dense layer with the same number of parameters — torchtn / that layer: "
            f"{summary} — **{'met' if met else 'NOT met'}**. The batched t-linear forward does "
            f"{' / '.join(f'{r:.1f}' for r in flop_ratios)}× the FLOPs of that dense layer (its two n × n "
            "transforms cost as much as its slice products), so at equal matmul rates it cannot match it; "
            + ("against the dense layer of the same sizes it is the faster one in every case, forward and training"
               if all(faster) else "it is not always faster than the dense layer of the same sizes either") + ".\n\n"
            "| case | layer | parameters | forward MFLOP | forward ms | training step ms |\n|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    else:
        print(section())
