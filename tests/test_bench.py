"""The benchmark scripts (`make bench`) on tiny cases: every contestant runs, the timings are real numbers, and the
contestants that compute the same map agree (the workers check it) — so a change to the library cannot quietly break
the benchmarks or make them compare different things. Peers that are not installed (`make bench-peers`) are left
out, as the benchmark itself does."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("adtn", "attention", "conv", "tproduct")}
    finally:
        sys.path.remove(str(BENCH))


def _times(result: dict) -> list[float]:
    return [v for entry in result.values() if isinstance(entry, dict) for k, v in entry.items() if k.endswith(("_ms", "_s"))]


def test_the_mpo_linear_grid_worker_times_every_contestant_on_the_same_cores():
    case = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 2], "rank": 2, "batch": 4, "reps": 2,
            "impls": ["dense", "rebuild-W", "tltorch", "torch-mpo", "torchtn", "torchtn-tuned"]}
    proc = subprocess.run([sys.executable, str(BENCH / "worker.py"), json.dumps(case)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert {"dense", "rebuild-W", "torchtn", "torchtn-tuned"} <= set(out)
    for impl in (k for k in out if not k.startswith("_")):
        assert out[impl]["infer_ms"] > 0 and out[impl]["train_ms"] > 0 and out[impl]["params"] > 0
        assert out[impl]["memory"]["total"] >= 4 * out[impl]["memory"]["params"]
    assert out["torchtn"]["params"] == out["rebuild-W"]["params"] < out["dense"]["params"]
    assert out["_machine"]["gemm_flops"] > 1e8


@pytest.mark.parametrize("name,case", [
    ("conv", {"c": 8, "hw": 6, "batch": 2, "rank": 2, "mapping": "kernel"}),
    ("conv", {"c": 8, "hw": 6, "batch": 2, "rank": 2, "mapping": "matrix"}),
    ("tproduct", {"fin": 4, "fout": 3, "n": 5, "batch": 2}),
    ("attention", {"n": 64, "d": 8, "training": True, "reps": 2}),
    ("attention", {"n": 64, "d": 8, "training": False, "reps": 2}),
    ("adtn", {"Q": 8, "depth": 2}),
])
def test_each_section_worker_runs_its_contestants(bench_modules, name, case):
    result = bench_modules[name].worker(case)
    times = _times(result) + [v for v in result.values() if isinstance(v, float) and not isinstance(v, bool)]
    contestants = [k for k, v in result.items() if not k.startswith("_")]
    assert len(contestants) >= 2
    assert times and all(math.isfinite(t) and t > 0 for t in times)
