#!/usr/bin/env bash
# Set up m2pt-fast:   bash setup.sh        (library, triton, bitsandbytes, deepspeed, peft)
#                     bash setup.sh dev    (the same plus the test and bench tools)
#
# torch is the user's: an installed torch is never replaced, upgraded or downgraded. It is pinned for
# every pip call below, so no requirement can swap it. A torch outside the supported range (setup.py's
# TORCH_REQUIREMENT) stops this script before anything is installed; M2PT_ANY_TORCH=1 goes on with it.
# With no torch at all, torch==$M2PT_TORCH_VERSION is installed first (default 2.13.0; "newest" asks
# for the newest release in the supported range): an unpinned torch would pull several GB of CUDA.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Prints the installed torch's version, whether the supported range holds it, and the range
# ("2.14.1+cu130 yes torch>=2.11,<2.16"; "none - torch>=..." without torch). The range is read from
# setup.py, its one place.
torch_status() {
    "$PY" - <<'EOF'
import ast, importlib.metadata as metadata
from pip._vendor.packaging.requirements import Requirement
tree = ast.parse(open("setup.py", encoding="utf-8").read())
spec = next(node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and getattr(node.targets[0], "id", "") == "TORCH_REQUIREMENT")
try:
    version = metadata.version("torch")
except metadata.PackageNotFoundError:
    raise SystemExit(print("none -", spec))
supported = Requirement(spec).specifier.contains(version, prereleases=True)
print(version, "yes" if supported else "no", spec)
EOF
}

status=$(torch_status)  # a failure here stops the script (set -e) before anything changes
read -r torch_version torch_supported torch_spec <<< "$status"
if [ "$torch_supported" = "no" ] && [ "${M2PT_ANY_TORCH:-0}" != "1" ]; then
    cat >&2 <<EOF
[setup] stopped: the installed torch is $torch_version; m2pt-fast supports $torch_spec.
[setup] Nothing was installed or changed. Either install a supported torch yourself, e.g.
[setup]     $PY -m pip install '$torch_spec'
[setup] or keep this one and install m2pt-fast beside it, untested:
[setup]     M2PT_ANY_TORCH=1 bash setup.sh ${1:-}
[setup] (setup.py then drops its torch and triton ranges: the kernels, the fused path and
[setup] DeepSpeed have not been run on torch $torch_version; the test suite says what breaks).
EOF
    exit 1
fi
if [ "$torch_version" = "none" ]; then
    want=${M2PT_TORCH_VERSION:-2.13.0}
    if [ "$want" = "newest" ]; then
        request=$(sed -n 's/^TORCH_REQUIREMENT = "\(.*\)"$/\1/p' setup.py)
    else
        request="torch==$want"
    fi
    # On machines without a GPU 2.13.0 resolves to the CPU build (a local wheel on ours).
    echo "[setup] no torch installed: installing $request"
    "${PIP[@]}" "$request"
    status=$(torch_status)
    read -r torch_version torch_supported torch_spec <<< "$status"
fi
# The installed torch, exactly, for every pip call from here on (also inside build environments).
echo "torch==$torch_version" > "$work/keep-torch.txt"
PIP+=(-c "$work/keep-torch.txt")

if ! "$PY" -c "import triton" 2>/dev/null; then
    # CUDA builds of torch bring the triton they pin; CPU builds bring none, and the kernels'
    # interpreter mode needs one: the release the same torch's CUDA build pins.
    case "$torch_version" in
        2.15.*) triton_default=3.9.0 ;;
        2.14.*) triton_default=3.8.0 ;;
        *) triton_default=3.7.1 ;;
    esac
    echo "[setup] installing triton==${M2PT_TRITON_VERSION:-$triton_default}"
    "${PIP[@]}" "triton==${M2PT_TRITON_VERSION:-$triton_default}"
fi

extras="triton,bitsandbytes,deepspeed,peft"
if [ "${1:-}" = "dev" ]; then extras="$extras,dev"; fi
echo "[setup] installing m2pt-fast[$extras] (torch $torch_version kept)"
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[$extras]"
"$PY" -c "import torch, m2pt_fast, m2pt_kernels; print(f'[setup] ok: torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
"$PY" -c "from m2pt_kernels import _native; print('[setup] NF4 on the CPU:', _native.describe())"
