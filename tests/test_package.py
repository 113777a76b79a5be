import subprocess
import sys
import tempfile


def _run_elsewhere(code: str) -> str:
    # From a neutral directory, so only the installed packages are visible (not the checkout's cwd).
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd)
    return out.stdout.strip()


def test_kernel_library_never_imports_m2pt_fast():
    assert _run_elsewhere("import sys, m2pt_kernels, m2pt_kernels.reference; print('m2pt_fast' in sys.modules)") == "False"


def test_no_top_level_kernels_package():
    # bitsandbytes probes for a package named `kernels`; ours must only be importable as m2pt_kernels.
    assert _run_elsewhere("import importlib.util; print(importlib.util.find_spec('kernels'))") == "None"


def test_kernels_directory_found_as_top_level_kernels_stays_inert():
    # With the repository root on sys.path, transformers and bitsandbytes import a top-level `kernels`
    # while probing for the Hugging Face kernel hub: it must offer them nothing and register no ops.
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); import kernels, torch; "
            "print(hasattr(kernels, 'prefix_attention'), hasattr(kernels, '__version__'), "
            "hasattr(torch.ops.m2pt_kernels, 'prefix_attention_forward'))")
    assert _run_elsewhere(code) == "False False False"
