"""Install m2pt-fast: the `m2pt_fast` trainer package and the `m2pt_kernels` kernel library.

The kernel library lives in kernels/ but is installed as `m2pt_kernels`: bitsandbytes probes for a
top-level package named `kernels`, so that name must never be importable from here.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

# torch is deliberately unpinned: setup.sh installs the right build first (CPU wheel on machines
# without a GPU, the existing CUDA build kept on GPU machines); pip then sees it satisfied.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "pillow>=10",
    "tqdm>=4.60",
    "numpy>=1.24",
    "pyyaml>=6",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-benchmark>=4"],
    "triton": ["triton>=3.2"],
    "bitsandbytes": ["bitsandbytes>=0.45"],
    # deepspeed ships only an sdist; setup.sh builds it with DS_BUILD_OPS=0 (ops JIT-compile later).
    "deepspeed": ["deepspeed>=0.16"],
    # flash-attn has no wheel on the registry (CUDA source build): never required.
    "gpu": ["flash-attn>=2.6"],
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() if k != "gpu" for r in v})

setup(
    name="m2pt-fast",
    version="0.1.0",
    description="Kernel-optimized Multimodal Prompt Tuning (M²PT) for LLaVA-class models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["m2pt_fast", "m2pt_kernels"],
    package_dir={"m2pt_kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
