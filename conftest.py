"""Make tests and benches import this checkout, even where another copy of the package is installed.

The kernel library's directory is `kernels/` but its import name is `m2pt_kernels`, so it is
registered here by path; `m2pt_fast` resolves through sys.path.
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
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location(
    "m2pt_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
)
_module = importlib.util.module_from_spec(_spec)
sys.modules["m2pt_kernels"] = _module
_spec.loader.exec_module(_module)
