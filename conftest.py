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


# Two tiers: `pytest` runs the fast one (the README's default command, a few minutes on 2 cores);
# `pytest --slow` adds the tests marked slow (multi-process DeepSpeed runs, whole trainer runs, the
# compile checks, fresh virtual environments), which CI runs too. Slow tests are deselected, not skipped,
# and the summary line counts them.
def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI runs them all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        deselected = set(slow)
        items[:] = [item for item in items if item not in deselected]


def pytest_report_header(config):
    return None if config.getoption("--slow") else "fast tier: the tests marked slow are deselected (--slow runs them)"
