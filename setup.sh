#!/usr/bin/env bash
# Set up m2pt-fast on a fresh machine:   bash setup.sh        (library, triton, bitsandbytes, deepspeed)
#                                         bash setup.sh dev    (the same plus the test and bench tools)
# torch comes first and is kept if present: an unpinned torch requirement on a machine without torch
# pulls the CUDA build and several GB of CUDA packages, and on a GPU box the installed CUDA build
# must not be replaced.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
    # On machines without a GPU this version resolves to the CPU build (a local wheel on ours).
    echo "[setup] installing torch==${M2PT_TORCH_VERSION:-2.13.0}"
    "${PIP[@]}" "torch==${M2PT_TORCH_VERSION:-2.13.0}"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
    # CPU torch wheels do not bring triton; the kernels' interpreter mode needs the version torch
    # 2.13 pins (newer ones are untested here).
    echo "[setup] installing triton==${M2PT_TRITON_VERSION:-3.7.1}"
    "${PIP[@]}" "triton==${M2PT_TRITON_VERSION:-3.7.1}"
fi

extras="triton,bitsandbytes,deepspeed,peft"
if [ "${1:-}" = "dev" ]; then extras="$extras,dev"; fi
echo "[setup] installing m2pt-fast[$extras]"
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[$extras]"
"$PY" -c "import torch, m2pt_fast, m2pt_kernels; print(f'[setup] ok: torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
"$PY" -c "from m2pt_kernels import _native; print('[setup] NF4 on the CPU:', _native.describe())"
