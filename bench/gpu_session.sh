#!/usr/bin/env bash
# Everything a GPU session checks and measures, as ONE command that ends within 8 minutes (a lease is
# 15 device-minutes, the machine's start included; one command may run 10). For a machine with a CUDA
# GPU whose Python already has torch, triton and transformers (the package need not be installed:
# pytest imports this checkout, kernels/README.md). Logs and JSON go to $OUT (default: gpu-out/).
#
#   bash bench/gpu_session.sh             # every stage, in priority order, within the budget
#   bash bench/gpu_session.sh --dry-run   # list the stages and their time limits; runs nothing
#   bash bench/gpu_session.sh step        # one stage by name
#
# Each stage has its own time limit and is cut short to what is left of M2PT_GPU_BUDGET_S (460 s); a
# stage that fails or times out keeps its log and the later stages still run; a stage cut to less
# than 20 s is skipped. The last lines printed are a table of the stages; $OUT/session.json says the
# same, with the device and versions.
#
# A machine without bitsandbytes/deepspeed and without a registry: bring their wheels in .whl/
# (docs/benchmarks.md, "The GPU machine"; e.g. pip download --no-deps -d .whl bitsandbytes;
# DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed); this script installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."

# name | time limit (s) | what it runs (priority order: the figures that matter most come first)
STAGES=(
    "versions|15|versions and device"
    "correctness|130|CUDA correctness: both kernels in bf16/fp16 at real shapes, fused vs reference"
    "kernels|85|prefix-attention and NF4 kernel benches"
    "step|160|the headline step, ours vs baseline: micro-batch 8, samples/s, peak memory against its count, MFU"
    "search|65|the largest micro-batch within 24 GiB, ours vs baseline"
)
# 8 minutes less what the wheel install, the kill grace of a timed-out stage and the summary take
BUDGET=${M2PT_GPU_BUDGET_S:-460}
MIN_STAGE_S=20

stage_command() {
    case "$1" in
        versions)
            nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
            python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
            python3 -c "import torch; print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" ;;
        correctness)
            python3 -m pytest -q -x --durations=10 -p no:cacheprovider tests/test_prefix_attention.py \
                tests/test_nf4.py tests/test_fused.py ;;
        kernels)
            python3 -m pytest -q -p no:cacheprovider bench/test_bench_prefix_attention.py bench/test_bench_nf4.py \
                --benchmark-only --benchmark-json="$OUT/kernels.json" ;;
        step)
            python3 -m pytest -q -p no:cacheprovider bench/test_bench_step.py -k test_train_step --benchmark-only \
                --benchmark-json="$OUT/step.json" && cp bench/results/headline-*.json "$OUT/" 2>/dev/null; true ;;
        search)
            python3 -m pytest -q -p no:cacheprovider bench/test_bench_step.py -k test_max_microbatch_24gib \
                --benchmark-only --benchmark-json="$OUT/search.json" ;;
        *) return 2 ;;
    esac
}

if [ "${1:-}" = "--dry-run" ]; then
    printf '%-12s %8s  %s\n' stage limit_s what
    total=0
    for entry in "${STAGES[@]}"; do
        IFS='|' read -r name limit what <<< "$entry"
        printf '%-12s %8s  %s\n' "$name" "$limit" "$what"
        total=$((total + limit))
    done
    printf '%-12s %8s  %s\n' total "$total" "(budget $BUDGET s)"
    exit 0
fi
only=${1:-}
if [ -n "$only" ] && ! printf '%s\n' "${STAGES[@]}" | grep -q "^$only|"; then
    echo "usage: bash bench/gpu_session.sh [--dry-run | versions | correctness | kernels | step | search]" >&2
    exit 2
fi

start=$SECONDS
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: pytest is handed file paths under it
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

rows=()
json=""
for entry in "${STAGES[@]}"; do
    IFS='|' read -r name limit what <<< "$entry"
    [ -n "$only" ] && [ "$name" != "$only" ] && continue
    left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt "$limit" ]; then  # cut short to what is left; not worth starting under MIN_STAGE_S
        limit=$left
        [ "$limit" -lt "$MIN_STAGE_S" ] && limit=0
    fi
    if [ "$limit" -le 0 ]; then
        status="skipped (no time left)"; took=0
    else
        began=$SECONDS
        echo "=== $name (limit ${limit} s): $what"
        # a subshell under timeout: a hung stage cannot hold the others back
        timeout --kill-after=5 "$limit" bash -c "$(declare -f stage_command); OUT='$OUT' stage_command $name" \
            > "$OUT/$name.log" 2>&1
        rc=$?
        took=$((SECONDS - began))
        tail -n 15 "$OUT/$name.log"
        case $rc in
            0) status=ok ;;
            124|137) status="timed out" ;;
            *) status="failed (exit $rc)" ;;
        esac
    fi
    rows+=("$(printf '%-12s %-24s %6s s' "$name" "$status" "$took")")
    json="$json${json:+,}{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $took, \"log\": \"$name.log\"}"
done

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
echo "{\"commit\": \"$commit\", \"date\": \"$(date -u +%FT%TZ)\", \"budget_s\": $BUDGET, \"seconds\": $((SECONDS - start)), \
\"versions\": $(python3 -c 'import json, pathlib; print(json.dumps(pathlib.Path("'"$OUT"'/versions.log").read_text() if pathlib.Path("'"$OUT"'/versions.log").exists() else ""))'), \
\"stages\": [$json]}" > "$OUT/session.json"
echo
printf '%-12s %-24s %8s\n' stage status time
printf '%s\n' "${rows[@]}"
echo "total $((SECONDS - start)) s of $BUDGET; logs and JSON in $OUT"
