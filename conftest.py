"""Test and bench configuration shared by tests/ and bench/.

Imports come from this checkout whatever else is installed: pyproject.toml's `pythonpath` puts the
root (m2pt_fast) and kernels/ (m2pt_kernels; kernels/README.md) first on sys.path in this process,
and PYTHONPATH does the same for the Python processes tests start (train.py runs, compile checks).
"""
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "kernels"), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# Without a GPU the Triton kernels run only in the interpreter, which triton selects when a kernel is
# decorated (at import): set it before anything imports triton. A user's explicit setting wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
