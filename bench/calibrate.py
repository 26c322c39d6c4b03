"""Fit a device's cost model to this machine: time every candidate plan of the benchmark grid, then search constants.

    python bench/calibrate.py --out runs/calibration.json          # measure (a few minutes), then fit
    python bench/calibrate.py --fit runs/calibration.json          # fit again from saved measurements
    python bench/calibrate.py --device cuda --out runs/calibration-cuda.json   # the CUDA model, on a GPU

For each cell (shape, rank, batch; inference and training) every candidate contraction plan of the ``"auto"`` strategy
whose cost-model estimate is within ``--within`` of the best estimate is timed side by side, in randomly ordered
rounds as in ``bench/run.py`` (so each call runs after another candidate's, as layers do in a network). The fit is a
coordinate search over the :class:`~torchtn.core.CostModel` constants that minimizes the geometric mean, over the
cells, of (measured time of the model's pick) / (fastest measured candidate); it prints the constants and the
per-cell losses before and after. The measurement is a plain function of the plans, so any constants can be scored
again from the saved JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import rounds  # noqa: E402

from torchtn.core.contraction import CostModel, TTLinearProblem  # noqa: E402
from torchtn.core.contraction.cost import get_cost_model  # noqa: E402
from torchtn.core.contraction.tt_linear_plans import _auto, plan_call, random_operands  # noqa: E402
from torchtn.core.tt import bond_caps  # noqa: E402

SHAPES = {"784x256": ((4, 7, 7, 4), (4, 4, 4, 4)), "1024x1024": ((4, 4, 8, 8), (4, 4, 8, 8)),
          "4096x4096": ((8, 8, 8, 8), (8, 8, 8, 8))}  # as in bench/run.py
RANKS, BATCHES = (4, 8, 16, 32), (1, 64, 256)
FIELDS = ("peak_flops", "bandwidth", "call_overhead", "fat", "batched", "gemm_exp", "cols_exp", "side_exp",
          "step_overhead")


def _ranks(in_shape, out_shape, r):
    return (1, *[min(r, c) for c in bond_caps(in_shape, out_shape)], 1)


def _key(plan) -> str:
    return f"{plan.direction}:{plan.groups}"


def measure_cell(p: TTLinearProblem, within: float, reps: int) -> dict[str, float]:
    """``{plan key: median ms}`` for the candidates of ``p`` within ``within``× of the best estimate (priced by the
    cost model in use for ``p``'s device)."""
    plans = sorted(_auto(p, get_cost_model(p.device)), key=lambda c: c.seconds)
    plans = [c for c in plans if c.seconds <= within * plans[0].seconds or c.is_dense]
    cores, x = random_operands(p)
    return rounds({_key(plan): plan_call(p, plan, cores, x) for plan in plans}, reps, warmup=2)


def problems(device: str = "cpu"):
    for name, (in_shape, out_shape) in SHAPES.items():
        for r in RANKS:
            for b in BATCHES:
                for training in (False, True):
                    yield name, TTLinearProblem(in_shape, out_shape, _ranks(in_shape, out_shape, r), b,
                                                training=training, input_grad=False, cache_merged=not training, device=device)


def loss(model: CostModel, cells: list[dict]) -> tuple[float, list[float]]:
    """Geo-mean over cells of measured(model's pick among the measured candidates) / measured best."""
    ratios = []
    for cell in cells:
        p = TTLinearProblem(**{**cell["problem"], "in_shape": tuple(cell["problem"]["in_shape"]),
                               "out_shape": tuple(cell["problem"]["out_shape"]),
                               "ranks": tuple(cell["problem"]["ranks"])})
        times = cell["ms"]
        priced = [(c.seconds, _key(c)) for c in _auto(p, model) if _key(c) in times]
        pick = min(priced)[1]
        ratios.append(times[pick] / min(times.values()))
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), ratios


def _sample(rng: random.Random, start: CostModel) -> CostModel:
    """A random model around ``start``: each rate and overhead scaled log-uniformly by up to 4×, exponents in (0, 1]."""
    values = {}
    for field in FIELDS:
        if field in ("batched", "gemm_exp", "cols_exp", "side_exp"):
            values[field] = rng.uniform(0.05, 1.0)
        elif field == "step_overhead":
            values[field] = max(start.call_overhead, start.step_overhead) * 4 ** rng.uniform(-2, 1)
        elif field == "fat":
            values[field] = rng.choice([16, 32, 48, 64, 96, 128])
        else:
            values[field] = getattr(start, field) * 4 ** rng.uniform(-1, 1)
    return dataclasses.replace(start, **values)


def fit(cells: list[dict], start: CostModel, rounds_: int = 3, samples: int = 800,
        seed: int = 0) -> CostModel:
    """Random search around ``start`` (``samples`` models), then a coordinate search from the best one (each constant
    scaled by factors of 2^±k/2), keeping any strict improvement."""
    best, best_loss = start, loss(start, cells)[0]
    rng = random.Random(seed)
    for _ in range(samples):
        cand = _sample(rng, start)
        cand_loss = loss(cand, cells)[0]
        if cand_loss < best_loss - 1e-6:
            best, best_loss = cand, cand_loss
    for _ in range(rounds_):
        for field in FIELDS:
            for f in (0.25, 0.5, 0.71, 1.41, 2.0, 4.0):
                value = getattr(best, field) * f
                if field == "fat":
                    value = max(8, int(round(value)))
                if field in ("batched", "gemm_exp", "cols_exp", "side_exp"):
                    value = min(1.0, value)
                cand = dataclasses.replace(best, **{field: value})
                cand_loss = loss(cand, cells)[0]
                if cand_loss < best_loss - 1e-6:
                    best, best_loss = cand, cand_loss
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/calibration.json"))
    ap.add_argument("--fit", type=Path, help="fit from saved measurements instead of measuring")
    ap.add_argument("--within", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="the device to measure on and whose cost model to fit (cpu, cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.fit:
        saved = json.loads(args.fit.read_text())
        cells, device = saved["cells"], saved.get("device", "cpu")
    else:
        cells, device = [], args.device
        for name, p in problems(device):
            ms = measure_cell(p, args.within, args.reps)
            cells.append({"name": name, "problem": {k: v for k, v in dataclasses.asdict(p).items()
                                                     if k not in ("dtype",)}, "ms": ms})
            print(f"{name} r{max(p.ranks)} B{p.batch} {'train' if p.training else 'infer'}: "
                  f"{len(ms)} candidates, best {min(ms.values()):.3f} ms", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"torch": torch.__version__, "device": device, "cells": cells}, indent=1))
            tmp.replace(args.out)
    start = get_cost_model(device)
    before, r0 = loss(start, cells)
    fitted = fit(cells, start)
    after, r1 = loss(fitted, cells)
    print(f"\ngeo-mean pick/best: default {before:.3f} -> fitted {after:.3f}")
    print("fitted:", {f: getattr(fitted, f) for f in FIELDS})
    if not args.fit:  # the whole fitted model, for bench/run.py --cost-model
        fitted_path = args.out.with_name(args.out.stem + "-fitted.json")
        fitted_path.write_text(json.dumps(dataclasses.asdict(fitted), indent=1))
        print(f"wrote {fitted_path}")
    for cell, a, b in zip(cells, r0, r1):
        if max(a, b) > 1.1:
            p = cell["problem"]
            print(f"  {cell['name']} ranks {p['ranks']} B{p['batch']} {'train' if p['training'] else 'infer'}: "
                  f"{a:.2f} -> {b:.2f}")


if __name__ == "__main__":
    main()
