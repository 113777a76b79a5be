"""The trainer's entry point: `deepspeed m2pt_fast/train.py --ds_config ds.json [options]`.

    deepspeed m2pt_fast/train.py --ds_config ds.json [options]        # one GPU or many
    torchrun --nproc_per_node 2 m2pt_fast/train.py --ds_config configs/zero2.json
    python m2pt_fast/train.py [options]                               # one process, no launcher
    python -m m2pt_fast.train [options]

The recipe itself is m2pt_fast.training.recipe.
"""
import sys

if __name__ == "__main__" and not __package__:
    # Run by path: Python put this file's folder first on sys.path, which would make the package's own
    # subpackages (data, models, ...) importable as top-level ones. Take it off; m2pt_fast and
    # m2pt_kernels come from the install (bash setup.sh).
    from pathlib import Path

    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    try:
        import m2pt_fast  # noqa: F401
    except ImportError as exc:
        sys.exit(f"cannot import m2pt_fast ({exc}): install this checkout first (bash setup.sh, or "
                 "pip install -e .), or run with PYTHONPATH=kernels:. from its root (kernels/README.md)")

from m2pt_fast.training.recipe import main  # noqa: E402  (after the path fix above)

if __name__ == "__main__":
    sys.exit(main())
