#!/usr/bin/env bash
# The GPU checks and benchmarks in as few calls as possible, for a machine with a CUDA GPU whose
# Python already has torch, triton and transformers (the package need not be installed: pytest
# imports this checkout, kernels/README.md). Logs and result files go to $OUT (default: gpu-out/).
#
#   bash bench/gpu_session.sh tests      # the test suite on CUDA (bf16/fp16 kernels at real shapes)
#   bash bench/gpu_session.sh kernels    # prefix-attention and NF4 benches
#   bash bench/gpu_session.sh step       # the end-to-end training step, ours vs baseline (headline)
#   bash bench/gpu_session.sh all        # all three (may exceed a 10-minute command limit)
#
# A machine without bitsandbytes/deepspeed and without a registry: build their wheels where there is
# one (pip download --no-deps -d .whl bitsandbytes; DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed)
# and bring .whl/ along; this script installs whatever is there into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: pytest is handed file paths under it, and $OUT may already be absolute
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

run_tests() {
    # The trainer's launcher tests are CPU/gloo tests; everything else runs on the GPU here.
    timeout 420 python3 -m pytest -q -x --durations=15 tests --ignore=tests/test_train.py 2>&1 | tee "$OUT/tests.log"
}
run_kernels() {
    timeout 420 python3 -m pytest -q bench/test_bench_prefix_attention.py bench/test_bench_nf4.py --benchmark-only \
        --benchmark-json="$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
}
run_step() {
    timeout 540 python3 -m pytest -q bench/test_bench_step.py --benchmark-only \
        --benchmark-json="$OUT/step.json" 2>&1 | tee "$OUT/step.log"
    cp bench/results/headline-*.json "$OUT/" 2>/dev/null
}

case "${1:-all}" in
    tests) run_tests ;;
    kernels) run_kernels ;;
    step) run_step ;;
    all) run_tests; run_kernels; run_step ;;
    *) echo "usage: bash bench/gpu_session.sh {tests|kernels|step|all}"; exit 2 ;;
esac
