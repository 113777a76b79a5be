import importlib
import subprocess
import sys


def test_kernel_library_never_imports_m2pt_fast():
    code = "import sys, m2pt_kernels, m2pt_kernels.reference; print('m2pt_fast' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_top_level_kernels_package():
    # bitsandbytes probes for a package named `kernels`; ours must only be importable as m2pt_kernels.
    assert importlib.util.find_spec("kernels") is None
