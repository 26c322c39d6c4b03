"""Benchmarks: torchtn's MPOLinear side by side with dense nn.Linear, a rebuild-W layer, tltorch and torch-mpo.

The grid: shapes 784×256, 1024×1024, 4096×4096, 4096→11008; ranks 4, 8, 16, 32; batches 1, 64, 256; forward in eval
and forward+backward in training. Each cell runs in fresh processes (big first-touch allocations make single runs
vary); inside a process the contestants are timed in rounds of random order. The tables quote the median over processes of
each process's median. Results, the targets and the machine go to ``docs/benchmarks.md``.

    python bench/run.py --out docs/benchmarks.md [--processes 2] [--reps 12] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

IMPLS = ["dense", "rebuild-W", "tltorch", "torch-mpo", "torchtn", "torchtn-tuned"]
PEERS = [i for i in IMPLS if not i.startswith("torchtn")]
SHAPES = [
    ("784×256", [4, 7, 7, 4], [4, 4, 4, 4]),
    ("1024×1024", [4, 4, 8, 8], [4, 4, 8, 8]),
    ("4096×4096", [8, 8, 8, 8], [8, 8, 8, 8]),
    ("4096→11008", [8, 8, 8, 8], [8, 8, 4, 43]),
]
RANKS = [4, 8, 16, 32]
BATCHES = [1, 64, 256]
SMALL_CELL = 1 << 20  # layers with at most this many weights: calls of µs to a few ms, timed in SMALL_REPS × more rounds
SMALL_REPS = 4


def cell_reps(case: dict, reps: int) -> int:
    """Rounds for a cell: more for small layers, whose medians of a dozen sub-millisecond calls move by ±10–20%
    between runs (measured: 784×256 r32 B64 read 1.20× dense in a 12-round grid and 1.03× over 200 rounds)."""
    weights = math.prod(case["in_shape"]) * math.prod(case["out_shape"])
    return reps * SMALL_REPS if weights <= SMALL_CELL else reps


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(device: str = "cpu") -> str:
    import torch

    from torchtn.report import machine_description

    gpu = f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), " if device != "cpu" else ""
    return (f"{gpu}{machine_description()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, tensorly-torch {version('tensorly-torch')} with opt_einsum "
            f"{version('opt_einsum')} (torch.backends.opt_einsum available: "
            f"{torch.backends.opt_einsum.is_available()}), torch-mpo {version('torch-mpo')}, torchtn {version('torchtn')}")


def run_cell(case: dict, processes: int, reps: int) -> dict:
    runs = []
    for _ in range(processes):
        spec = json.dumps({**case, "impls": IMPLS, "reps": reps})
        proc = subprocess.run([sys.executable, str(HERE / "worker.py"), spec], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed for {case}: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    merged = {"_machine": {k: statistics.median(r["_machine"][k] for r in runs) for k in ("gemm_flops",
                                                                                       "optimal_flops")}}
    for impl in runs[0]:
        if impl.startswith("_"):
            continue
        merged[impl] = {
            "infer_ms": statistics.median(r[impl]["infer_ms"] for r in runs),
            "train_ms": statistics.median(r[impl]["train_ms"] for r in runs),
            "memory": runs[0][impl]["memory"],
            "params": runs[0][impl]["params"],
            **{k: runs[0][impl][k] for k in ("plan_infer", "plan_train") if k in runs[0][impl]},
        }
    return merged


def tt_svd_bench() -> list[tuple]:
    """``tt_svd`` against TensorLy's exact TT-SVD (``tensor_train_matrix``, PyTorch backend) of the same matrix."""
    import tensorly as tl
    import torch
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    from torchtn import tt_svd, tt_to_dense

    tl.set_backend("pytorch")
    torch.manual_seed(0)
    rows = []
    for n, modes, rank in ((4096, (8, 8, 8, 8), 64), (1024, (4, 4, 8, 8), 16), (64, (4, 4, 4), 4)):
        u, _ = torch.linalg.qr(torch.randn(n, n))
        v, _ = torch.linalg.qr(torch.randn(n, n))
        a = (u * torch.exp(-torch.arange(n, dtype=torch.float32) / (n / 40))) @ v.T
        t0 = time.perf_counter()
        cores = tt_svd(a, modes, modes, max_rank=rank)
        t_ours = time.perf_counter() - t0
        err_ours = float(torch.linalg.norm(tt_to_dense(cores) - a) / torch.linalg.norm(a))
        t0 = time.perf_counter()
        factors = tensor_train_matrix(a.reshape(*modes, *modes), rank=[1] + [rank] * (len(modes) - 1) + [1])
        t_exact = time.perf_counter() - t0
        err_exact = float(torch.linalg.norm(tt_matrix_to_tensor(factors).reshape(n, n) - a) / torch.linalg.norm(a))
        rows.append((f"{n}×{n}, modes {modes}, max_rank {rank}", round(t_exact, 3), round(t_ours, 3),
                     round(t_exact / t_ours, 1), f"{err_exact:.5f}", f"{err_ours:.5f}", f"{err_ours / err_exact:.4f}"))
    return rows


def fmt(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def best_peer(res: dict, key: str) -> tuple[str, float]:
    peers = [(res[i][key], i) for i in PEERS if i in res]
    t, name = min(peers)
    return name, t


def flop_floor(case: dict, training: bool) -> float:
    """The fewest FLOPs of any plan torchtn can run for this cell, over the dense layer's FLOPs (1 = the same work).

    Dense: ``2·B·M·N`` forward, twice that in training (forward + weight gradient; the input needs no gradient).
    torchtn's plans are counted as the planner prices them (in training every step's forward and both backward
    products, merges three times), so the training floor is an upper estimate by up to one product.
    A ratio near or above 1 means the tensor network does as much arithmetic as the dense layer, in thinner
    (slower) products: such a cell cannot beat dense on a CPU whatever the order of contraction.
    """
    from torchtn.core import bond_caps
    from torchtn.core.contraction import DEFAULT_COST_MODEL, TTLinearProblem
    from torchtn.core.contraction.tt_linear_plans import _auto

    ranks = tuple([1] + [min(case["rank"], c) for c in bond_caps(case["in_shape"], case["out_shape"])] + [1])
    p = TTLinearProblem(tuple(case["in_shape"]), tuple(case["out_shape"]), ranks, case["batch"], training=training,
                        cache_merged=not training)
    dense = 2 * case["batch"] * math.prod(case["in_shape"]) * math.prod(case["out_shape"]) * (2 if training else 1)
    return min(c.flops for c in _auto(p, DEFAULT_COST_MODEL)) / dense


def summarize(results: list) -> tuple[str, list[str]]:
    """The issue's three ratio targets with the numbers of this run, and the cells that miss them."""
    from torchtn.report import format_markdown_table

    misses, worst_f, worst_t = [], (0, ""), (0, "")
    tl_f, tl_t, roof, mem = [], [], [], []
    for case, label, res in results:
        tn = res["torchtn"]
        weights = math.prod(case["in_shape"]) * math.prod(case["out_shape"])
        name, t = best_peer(res, "infer_ms")
        ratio = tn["infer_ms"] / t
        limit = 1.25 if case["batch"] == 1 else 1.10
        if ratio > limit:
            misses.append(f"forward {label}: {ratio:.2f}× {name} (limit {limit:.2f}×; autotuned "
                          f"{res['torchtn-tuned']['infer_ms'] / t:.2f}×; fewest-FLOP plan / dense FLOPs "
                          f"{flop_floor(case, False):.2f})")
        worst_f = max(worst_f, (ratio, f"{label} vs {name}"))
        name, t = best_peer(res, "train_ms")
        ratio = tn["train_ms"] / t
        limit = 1.15 if weights >= 1_000_000 else 1.50
        if ratio > limit:
            misses.append(f"training {label}: {ratio:.2f}× {name} (limit {limit:.2f}×; autotuned "
                          f"{res['torchtn-tuned']['train_ms'] / t:.2f}×; fewest-FLOP plan / dense FLOPs "
                          f"{flop_floor(case, True):.2f})")
        worst_t = max(worst_t, (ratio, f"{label} vs {name}"))
        if "tltorch" in res:
            tl_f.append(res["tltorch"]["infer_ms"] / tn["infer_ms"])
            tl_t.append(res["tltorch"]["train_ms"] / tn["train_ms"])
        if case["name"] == "4096×4096":
            roof_ms = 1e3 * res["_machine"]["optimal_flops"] / res["_machine"]["gemm_flops"]
            roof.append((tn["infer_ms"] / roof_ms, label))
        mem.append(tn["memory"]["total"] / res["dense"]["memory"]["total"])
    geo = (lambda v: math.exp(sum(map(math.log, v)) / len(v))) if tl_f else (lambda v: float("nan"))
    worst_roof = max(roof) if roof else (float("nan"), "")
    rows = [
        ("no forward cell slower than the best other contestant by > 10% (25% at batch 1)",
         f"worst: {worst_f[0]:.2f}× ({worst_f[1]}); {sum(m.startswith('forward') for m in misses)} cells miss",
         "met" if not any(m.startswith("forward") for m in misses) else "NOT met"),
        ("no training cell slower than the best other contestant by > 15% (≥ 1M weights) / 50% (smaller)",
         f"worst: {worst_t[0]:.2f}× ({worst_t[1]}); {sum(m.startswith('training') for m in misses)} cells miss",
         "met" if not any(m.startswith("training") for m in misses) else "NOT met"),
        ("geo-mean over the grid vs tltorch (opt_einsum) ≥ 2.5× forward", f"{geo(tl_f):.2f}×",
         "met" if geo(tl_f) >= 2.5 else "NOT met"),
        ("geo-mean over the grid vs tltorch (opt_einsum) ≥ 1.6× forward+backward", f"{geo(tl_t):.2f}×",
         "met" if geo(tl_t) >= 1.6 else "NOT met"),
        ("4096×4096 forward within 2× of the roofline (opt_einsum-optimal FLOPs at this run's GEMM rate)",
         f"worst: {worst_roof[0]:.2f}× ({worst_roof[1]})", "met" if worst_roof[0] <= 2 else "NOT met"),
        ("training memory ≤ the dense layer's, every cell", f"worst torchtn / dense = {max(mem):.3f}",
         "met" if max(mem) <= 1 else "NOT met"),
    ]
    return format_markdown_table(["target", "measured", "status"], rows), misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="one process, few repetitions, batch 64 only")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--render-json", type=Path, default=None,
                        help="measure nothing: write the tables from a --json file of an earlier run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every contestant runs there; the GPU is "
                                                        "synchronized around every timed call)")
    parser.add_argument("--cost-model", type=Path, default=None,
                        help="torchtn plans with this cost model for --device (a JSON of CostModel fields, as "
                             "bench/calibrate.py writes it) instead of the built-in one")
    parser.add_argument("--only", action="append", default=None, metavar="SHAPE",
                        help=f"measure only this layer shape (repeatable; one of {', '.join(n for n, *_ in SHAPES)}, "
                             "'x' for '×' and '→')")
    args = parser.parse_args()
    shapes = SHAPES
    if args.only:
        def ascii_name(name: str) -> str:
            return name.replace("×", "x").replace("→", "x")

        names = {ascii_name(n): n for n, *_ in SHAPES}
        unknown = [o for o in args.only if ascii_name(o) not in names]
        if unknown:
            parser.error(f"--only {unknown[0]!r} is not a shape of the grid: expected one of {', '.join(names)}")
        wanted = {names[ascii_name(o)] for o in args.only}
        shapes = [s for s in SHAPES if s[0] in wanted]
    cost_model = json.loads(args.cost_model.read_text()) if args.cost_model else None
    batches = BATCHES
    if args.quick:
        args.processes, args.reps, batches = 1, 5, [64]
    from torchtn.report import format_markdown_table

    start = time.time()
    if args.render_json:  # tables from an earlier (possibly partial) run's raw results, measured elsewhere
        saved = json.loads(args.render_json.read_text())
        results = [(c["case"], c["label"], c["res"]) for c in saved["cells"]]
        args.device, args.processes, args.reps = saved["device"], saved["processes"], saved["reps"]
        machine_text, took, conv = saved["machine"], saved["seconds"], saved.get("conv", "")
        command = saved.get("command", "")
    else:
        machine_text, results, conv = machine(args.device), [], ""
        command = " ".join(["python", "bench/run.py"] + sys.argv[1:])

        def dump(seconds: float) -> None:  # after every cell, so a run cut short still leaves its cells
            if args.json:
                tmp = args.json.with_suffix(".tmp")
                tmp.write_text(json.dumps({"command": command, "machine": machine_text, "device": args.device, "processes": args.processes,
                                           "reps": args.reps, "seconds": seconds, "conv": conv,
                                           "cells": [{"case": c, "label": lab, "res": r} for c, lab, r in results]},
                                          indent=1))
                tmp.replace(args.json)

        for name, in_shape, out_shape in shapes:
            for rank in RANKS:
                for batch in batches:
                    case = {"name": name, "in_shape": in_shape, "out_shape": out_shape, "rank": rank, "batch": batch,
                            "device": args.device}
                    if cost_model:
                        case["cost_model"] = cost_model
                    label = f"{name} r{rank} B{batch}"
                    print(f"running {label} ...", file=sys.stderr, flush=True)
                    results.append((case, label, run_cell(case, args.processes, cell_reps(case, args.reps))))
                    dump(time.time() - start)
        sys.path.insert(0, str(HERE))
        from conv import section as conv_section

        conv = conv_section(args.device)
        if args.device == "cpu":
            from adtn import section as adtn_section
            from attention import section as attention_section
            from tproduct import section as tproduct_section

            conv += "\n" + attention_section() + "\n" + tproduct_section() + "\n" + adtn_section()
        took = time.time() - start
        dump(took)

    def row(label, res, key):
        cells = [label] + [fmt(res[i][key]) if i in res else "n/a" for i in IMPLS]
        name, t = best_peer(res, key)
        return cells + [f"{res['torchtn'][key] / t:.2f}× {name}"]

    heads = ["layer, rank, batch"] + [f"{i} ms" for i in IMPLS] + ["torchtn / best other (lower is better)"]
    infer = format_markdown_table(heads, [row(label, res, "infer_ms") for _, label, res in results])
    train = format_markdown_table(heads, [row(label, res, "train_ms") for _, label, res in results])
    mem_rows = []
    for _, label, res in results:
        d, t = res["dense"]["memory"], res["torchtn"]["memory"]
        mem_rows.append([label, f"{d['total'] / 2**20:.2f}", f"{t['total'] / 2**20:.2f}",
                         f"{t['total'] / d['total']:.3f}"] +
                        [f"{res[i]['memory']['total'] / 2**20:.2f}" if i in res else "n/a"
                         for i in ("rebuild-W", "tltorch", "torch-mpo")])
    memory = format_markdown_table(["layer, rank, batch", "dense MiB", "torchtn MiB", "torchtn / dense",
                                    "rebuild-W MiB", "tltorch MiB", "torch-mpo MiB"], mem_rows)
    roof_rows = []
    for case, label, res in results:
        if case["name"] != "4096×4096":
            continue
        roof_ms = 1e3 * res["_machine"]["optimal_flops"] / res["_machine"]["gemm_flops"]
        roof_rows.append([label, f"{res['_machine']['optimal_flops'] / 1e6:.1f}",
                          f"{res['_machine']['gemm_flops'] / 1e9:.0f}", fmt(roof_ms), fmt(res["torchtn"]["infer_ms"]),
                          f"{res['torchtn']['infer_ms'] / roof_ms:.2f}×"])
    roofline = format_markdown_table(["cell", "optimal MFLOP (opt_einsum)", "GEMM GFLOP/s (this run)",
                                      "roofline ms", "torchtn ms", "torchtn / roofline"], roof_rows)
    plans = "\n".join(f"- {label}: inference — {res['torchtn']['plan_infer']}; training — "
                      f"{res['torchtn']['plan_train']}" for _, label, res in results)
    targets, misses = summarize(results)
    missed = "\n".join(f"- {m}" for m in misses) or "- none"
    svd = format_markdown_table(["task", "TensorLy exact TT-SVD s", "torchtn tt_svd s", "speed-up", "exact error",
                                 "tt_svd error", "error ratio"], tt_svd_bench()) \
        if args.device == "cpu" and not args.render_json else "(measured on the CPU only; see docs/benchmarks.md)"
    given = results[0][0].get("cost_model") if results else None
    fitted_note = (f" — here with the cost model given by `--cost-model` (fitted by `bench/calibrate.py` on this "
                   f"machine): `{given}`") if given else ""
    text = f"""# Benchmarks

Generated by `{command}` on {time.strftime('%Y-%m-%d')} (`make bench` runs it on the CPU into docs/benchmarks.md).

Machine: {machine_text}.

Method: fp32 on {args.device} (TF32 off). Each cell runs in {args.processes} fresh processes; in each process the contestants are timed in
{args.reps} rounds (training: {max(5, args.reps // 2)}; {SMALL_REPS}× as many for the layers of at most {SMALL_CELL:,} weights, whose calls are short), one call each per round in a fresh random order every round (so no contestant always follows the same one),
after 3 warm-up rounds; the tables give the median over processes of each process's median. *Forward* is
`layer.eval()` under `torch.no_grad()` (torchtn may reuse merged cores between calls); *training* is forward +
`backward()` of `y.sum()` with gradients for every parameter. Contestants at the same shapes and ranks: dense
`nn.Linear`; *rebuild-W*, the same cores contracted to `W` every call, then `F.linear` (what users write first);
tltorch `FactorizedLinear(factorization="blocktt")` with `opt_einsum` installed (so `torch.einsum` optimizes its
contraction order, as its users run it); torch-mpo `TTLinear`; torchtn `MPOLinear` with its default planner (cost
model, no autotuning){fitted_note}. The last column is torchtn's time over the best other contestant's in that cell: below 1
torchtn wins, above 1 it loses. Whole run: {took / 60:.1f} min.

## Targets, checked on this run

{targets}

Cells that miss their target:

{missed}

## Forward, inference (median ms)

{infer}

## Training step: forward + backward (median ms)

{train}

## 4096×4096 forward against the roofline

The roofline is the FLOP count of `x Wᵀ` over the cores in opt_einsum's `optimal` contraction order (opt_einsum's
own count), divided by the rate of a 2048³ fp32 GEMM measured in the same process.

{roofline}

## Training memory at the same shape and batch

Parameters + gradients + Adam state (2× parameters) + tensors saved for backward (measured with
`torch.autograd.graph.saved_tensors_hooks`, counting each storage once and parameters only as parameters).

{memory}

## What torchtn's planner chose

{plans}

{conv}
## TT-SVD against an exact TT-SVD of the same matrix

Matrices with singular values `exp(-40 i/n)` (a slowly decaying spectrum, hard for sketches), one rank cap for every
bond. The exact TT-SVD is TensorLy's `tensor_train_matrix` (PyTorch backend: the same LAPACK SVDs at every bond);
torchtn's `tt_svd` uses exact SVDs for unfoldings with a side below 512 and a randomized SVD with exactly measured
error above.
Errors are `‖W − W_tt‖_F / ‖W‖_F`.

{svd}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
