"""Tensor Attention's forms against each other and against softmax attention (one fresh process per case).

    python bench/attention.py       # prints a Markdown section; bench/run.py includes it in docs/benchmarks.md

Targets (issue 8): the chunked form (the training default) ≥ 10× faster than the token loop at n = 4k, d = 64; causal
tensor attention at n = 16k faster than softmax attention at the same n.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [  # (n, training?)
    (4096, False), (4096, True), (16384, False), (16384, True),
]


def worker(case: dict) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from worker import rounds

    from torchtn.core.attention import linear_attention, softmax_attention, tensor_attention

    torch.manual_seed(0)
    n, d, training = case["n"], case["d"], case["training"]
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=training) for _ in range(3))
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    fns = {"softmax (SDPA, causal)": lambda: softmax_attention(q, k, v),
           "linear (chunked)": lambda: linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, form="chunked"),
           "tensor (chunked)": lambda: tensor_attention(qn, kn, v, form="chunked")}
    if not training and n <= 4096:
        fns["tensor (token loop)"] = lambda: tensor_attention(qn, kn, v, form="recurrent")

    def run(fn):
        def call():
            if training:
                for t in (q, k, v):
                    t.grad = None
                fn().sum().backward(retain_graph=True)
            else:
                with torch.no_grad():
                    fn()
        return call

    return rounds({name: run(fn) for name, fn in fns.items()}, case["reps"], warmup=1)


def section() -> str:
    rows, results = [], {}
    for n, training in CASES:
        case = {"n": n, "d": 64, "training": training, "reps": 5}
        proc = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True,
                              check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(n, training)] = res
        soft, tens = res["softmax (SDPA, causal)"], res["tensor (chunked)"]
        loop = res.get("tensor (token loop)")
        rows.append(f"| {n:,} | {'forward + backward' if training else 'forward'} | {soft:.1f} | "
                    f"{res['linear (chunked)']:.1f} | {tens:.1f} | {f'{loop:.0f}' if loop else '–'} | "
                    f"{tens / soft:.2f}× | {f'{loop / tens:.0f}×' if loop else '–'} |")
    head = ("| n | pass | softmax ms | linear ms | tensor (chunked) ms | tensor (token loop) ms | tensor / softmax | "
            "loop / chunked |\n|---|---|---|---|---|---|---|---|")
    speed = results[(4096, False)]["tensor (token loop)"] / results[(4096, False)]["tensor (chunked)"]
    vs = results[(16384, False)]["tensor (chunked)"] / results[(16384, False)]["softmax (SDPA, causal)"]
    return ("## Attention: Tensor Attention's forms and softmax attention\n\nfp32, batch 1, one head, d = 64, causal; "
            "median of randomly ordered rounds in one fresh process per row. Tensor attention is the strictly masked "
            "second-order form on L2-normalized q, k (as `TensorAttention` runs it), chunked at the planner's chunk "
            "size; softmax is PyTorch's fused `scaled_dot_product_attention(is_causal=True)`. Targets (issue 8): "
            f"chunked ≥ 10× the token loop at n = 4k — **{speed:.0f}×, {'met' if speed >= 10 else 'NOT met'}**; "
            f"tensor faster than softmax at n = 16k — **{vs:.2f}×, {'met' if vs < 1 else 'NOT met'}** (forward)."
            "\n\n" + head + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    else:
        print(section())
