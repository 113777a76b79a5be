"""Make tests and benches import this checkout, even where another copy of the package is installed.

Both packages are registered by path rather than by putting the repository root on sys.path: the
kernel library's directory is `kernels/`, and a top-level `kernels` must never be importable
(bitsandbytes probes for a package of that name). pytest runs with --import-mode=importlib for the
same reason (pyproject.toml).
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run only in the interpreter, which triton selects when a kernel is
# decorated (at import): set it before anything imports triton. A user's explicit setting wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent


def _register(name: str, directory: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register("m2pt_kernels", ROOT / "kernels")
_register("m2pt_fast", ROOT / "m2pt_fast")
