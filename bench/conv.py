"""MPOConv2d against nn.Conv2d and tltorch's factorized convolution on VGG-like shapes (one fresh process per case).

    python bench/conv.py            # prints a Markdown section; bench/run.py includes it in docs/benchmarks.md
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [  # channels, map size, batch, MPO bond, kernel mapping (matrix: im2col MPO; kernel: TT over C_in, kh, kw, C_out)
    {"c": 256, "hw": 16, "batch": 32, "rank": 16, "mapping": "matrix"},
    {"c": 256, "hw": 16, "batch": 32, "rank": 16, "mapping": "kernel"},
    {"c": 512, "hw": 8, "batch": 32, "rank": 16, "mapping": "matrix"},
    {"c": 512, "hw": 8, "batch": 32, "rank": 16, "mapping": "kernel"},
]


def worker(case: dict) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from worker import infer_and_train

    from torchtn import MPOConv2d

    torch.manual_seed(0)
    c, hw, b = case["c"], case["hw"], case["batch"]
    device = case.get("device", "cpu")
    x = torch.randn(b, c, hw, hw, device=device)
    layers = {"dense": nn.Conv2d(c, c, 3, padding=1),
              "torchtn": MPOConv2d(c, c, 3, padding=1, rank=case["rank"], mapping=case["mapping"])}
    kernel = layers["torchtn"].num_weight_params
    try:
        import tltorch

        tl = tltorch.FactorizedConv(c, c, 3, order=2, padding=1, factorization="tt", rank=kernel / (c * c * 9),
                                    bias=True, has_bias=True)
        # tltorch leaves the factors uninitialized (torch.empty: garbage, NaN and denormal floats that slow every
        # product down ~10×); initialize them as its own from_conv does, at nn.Conv2d's kernel scale
        tl.reset_parameters(std=(1 / (3 * c * 9)) ** 0.5)
        layers["tltorch"] = tl
    except ImportError:
        pass
    layers = {k: v.to(device) for k, v in layers.items()}
    out = infer_and_train(layers, x, 10, 6)
    out["_kernel_ratio"] = c * c * 9 / kernel
    with torch.no_grad():  # what the planner ran (inference; training is planned the same way)
        layers["torchtn"].eval()(x)
    out["_plan"] = sorted({v for v in layers["torchtn"]._merged.plans.values() if isinstance(v, str)})
    return out


def section(device: str = "cpu") -> str:
    rows = []
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, json.dumps({**case, "device": device})], capture_output=True,
                              text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        tl = res.get("tltorch")
        rows.append(f"| {case['c']}→{case['c']} 3×3, {case['hw']}×{case['hw']}, B{case['batch']}, {case['mapping']} "
                    f"mapping, D={case['rank']} ({', '.join(res['_plan']) or 'rebuild'}) | "
                    f"{res['_kernel_ratio']:.1f}× | {res['dense']['infer_ms']:.2f} | "
                    f"{tl['infer_ms'] if tl else float('nan'):.2f} | {res['torchtn']['infer_ms']:.2f} | "
                    f"{res['torchtn']['infer_ms'] / res['dense']['infer_ms']:.2f}× | {res['dense']['train_ms']:.2f} | "
                    f"{tl['train_ms'] if tl else float('nan'):.2f} | {res['torchtn']['train_ms']:.2f} | "
                    f"{res['torchtn']['train_ms'] / res['dense']['train_ms']:.2f}× |")
    head = ("| case | kernel compression | dense fwd ms | tltorch TT fwd ms | torchtn fwd ms | torchtn / dense | "
            "dense train ms | tltorch train ms | torchtn train ms | torchtn / dense |\n|---|---|---|---|---|---|---|---|---|---|")
    return (f"## Convolutions: MPOConv2d vs nn.Conv2d and tltorch ({device})\n\nfp32, median of randomly ordered rounds in one fresh "
            "process per case; tltorch `FactorizedConv(factorization=\"tt\")` at the same number of kernel "
            "parameters. `MPOConv2d` with the default im2col-matrix mapping (channel modes paired per core) and with "
            "`mapping=\"kernel\"` (the TT of the 4-D kernel over C_in, kh, kw, C_out — the same network as "
            "tltorch's TT convolution); in brackets the way the planner ran it (rebuild: kernel + `F.conv2d`; "
            "sequential: four small convolutions). Targets (issue 10): at ≥ 10× fewer kernel parameters, inference "
            "within 10% of `nn.Conv2d`, training within 25%, faster than tltorch.\n\n" + head + "\n" + "\n".join(rows)
            + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    else:
        print(section())
