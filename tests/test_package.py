"""How the two packages are found (kernels/README.md): installed, from a checkout, and never as `kernels`."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, pythonpath: list[Path] | None) -> str:
    """Run `code` in a fresh Python in a neutral directory, with only `pythonpath` added to the installed
    packages (None: the installed packages alone)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _installed() -> bool:
    return _run("import importlib.util; print(importlib.util.find_spec('m2pt_kernels') is not None)", None) == "True"


def test_kernel_library_never_imports_m2pt_fast():
    code = "import sys, m2pt_kernels, m2pt_kernels.reference; print('m2pt_fast' in sys.modules)"
    assert _run(code, [ROOT / "kernels"]) == "False"


def test_kernels_folder_is_not_a_package():
    # A kernels/__init__.py would make the checkout's root a place to import a top-level `kernels` from.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "m2pt_kernels" / "__init__.py").is_file()


def test_checkout_imports_its_own_packages():
    # What pyproject.toml's pythonpath and conftest.py's PYTHONPATH give the tests and their children.
    code = "import m2pt_kernels, m2pt_fast; print(m2pt_kernels.__file__); print(m2pt_fast.__file__)"
    kernels_file, fast_file = _run(code, [ROOT / "kernels", ROOT]).splitlines()
    assert Path(kernels_file) == ROOT / "kernels" / "m2pt_kernels" / "__init__.py"
    assert Path(fast_file) == ROOT / "m2pt_fast" / "__init__.py"


def _hub_kernels_file() -> str:
    """Where the kernel hub's own `kernels` package is installed ("" when it is not). transformers 5.25
    requires it; earlier releases only probe for it."""
    code = ("import importlib.metadata as m\n"
            "try:\n    print(m.distribution('kernels').locate_file('kernels/__init__.py'))\n"
            "except m.PackageNotFoundError:\n    print('')\n")
    return _run(code, None)


def test_installed_packages_and_no_top_level_kernels():
    if not _installed():
        pytest.skip("this environment has no installed m2pt-fast (bash setup.sh installs it)")
    code = ("import importlib.util, m2pt_kernels, m2pt_fast; spec = importlib.util.find_spec('kernels'); "
            "print(spec and spec.origin); print(m2pt_kernels.prefix_attention.__module__)")
    found, module = _run(code, None).splitlines()
    assert module == "m2pt_kernels.prefix_attention"
    hub = _hub_kernels_file()  # the only `kernels` there may be is the hub's
    assert (Path(found) == Path(hub)) if hub else found == "None", (found, hub)


def test_checkout_root_on_sys_path_gives_the_probes_nothing():
    # With the root on sys.path (python -m ... run from it), kernels/ must not stand in for the hub's
    # package: where that is installed, `import kernels` still finds it (a regular package wins over a
    # namespace portion wherever it sits on the path) and transformers' probe says what it says without
    # the root; where it is not, `kernels` is an empty namespace package, the probe must call the hub
    # absent (5.24 imports the module to decide) and the bitsandbytes probe's import must fail. No torch
    # op may be registered twice either way.
    code = ("import kernels, torch\n"
            "from transformers.utils import import_utils\n"
            "print(kernels.__file__, [n for n in dir(kernels) if not n.startswith('__')][:1])\n"
            "print(import_utils.is_kernels_available())\n"
            "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('ImportError')\n"
            "else:\n    print(get_kernel.__module__.split('.')[0])\n"
            "print(hasattr(torch.ops.m2pt_kernels, 'prefix_attention_forward'))\n")
    lines = _run(code, [ROOT]).splitlines()
    hub = _hub_kernels_file()
    if not hub:
        assert lines == ["None []", "False", "ImportError", "False"]
        return
    without_root = _run("from transformers.utils import import_utils; print(import_utils.is_kernels_available())", None)
    assert Path(lines[0].split(" ")[0]) == Path(hub), lines
    assert lines[1:] == [without_root, "kernels", "False"], lines
