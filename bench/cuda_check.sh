#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine (no install needed where torch, pytest, opt_einsum, safetensors,
# tqdm, scikit-learn and matplotlib are present; tltorch and torch-mpo as wheels in .whl/ if given):
#   1. fit the CUDA cost model to this GPU (bench/calibrate.py --device cuda),
#   2. the CUDA tests (tests/test_cuda.py; every layer type on the GPU in tests/test_registry.py),
#   3. the benchmark grid on the GPU, with the fitted cost model (bench/run.py --device cuda --cost-model ...).
# Usage: bash bench/cuda_check.sh OUTDIR      (each step has a time limit; partial results stay in OUTDIR)
set -u
out=${1:?usage: bash bench/cuda_check.sh OUTDIR}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
t0=$SECONDS
timeout "${CALIBRATE_S:-110}" python3 bench/calibrate.py --device cuda --out "$out/calibration-cuda.json" --reps 9 \
    2>&1 | grep -v '^USDT' | tail -40
echo "calibrate: $((SECONDS - t0)) s"; t0=$SECONDS
timeout "${TESTS_S:-200}" python3 -m pytest tests/test_cuda.py tests/test_registry.py -q -p no:cacheprovider -rs 2>&1 | tee "$out/tests-cuda.log" | tail -15
echo "tests: $((SECONDS - t0)) s"; t0=$SECONDS
fitted=()
[ -f "$out/calibration-cuda-fitted.json" ] && fitted=(--cost-model "$out/calibration-cuda-fitted.json")
timeout "${BENCH_S:-270}" python3 bench/run.py --device cuda --processes 1 --reps "${REPS:-12}" "${fitted[@]}" \
    --json "$out/cuda.json" --out "$out/benchmarks-cuda.md" 2>&1 | grep -v '^running\|^USDT' | tail -5
echo "bench: $((SECONDS - t0)) s"
[ -f "$out/benchmarks-cuda.md" ] && sed -n '/## Targets/,/Cells that miss/p' "$out/benchmarks-cuda.md"
