"""Install m2pt-fast: the `m2pt_fast` trainer package and the `m2pt_kernels` kernel library.

The kernel library's sources are kernels/m2pt_kernels/ (why there, and how Python finds it:
kernels/README.md); `package_dir` below maps the package to that folder.

Native part (vLLM's pattern: Python decides what to build, CMakeLists.txt decides how): the C++/OpenMP
NF4 quantizer in csrc/ is built when CMake and a C++ compiler are found. Without them, or when the
build fails, the install goes on pure-Python (m2pt_kernels then quantizes with PyTorch, slower) and
says so. M2PT_BUILD_NATIVE=0 skips the build, =1 makes a failed build an error.

Version ranges: the releases the test suite has passed on (docs/compatibility.md lists them, and how
to check a newer one). transformers is capped just past the newest minor release that passed,
because m2pt_fast uses its internals (layer classes, caches, mask helpers; m2pt_fast/compat.py).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# torch is not pinned to one build: setup.sh installs one first where none is present and otherwise
# keeps the installed build (pinned for pip, so that no requirement can replace it). setup.sh reads
# TORCH_REQUIREMENT from this file to refuse an unsupported torch before it changes anything.
# M2PT_ANY_TORCH=1 (setup.sh says when) drops the torch and triton ranges: an untested pairing.
ANY_TORCH = os.environ.get("M2PT_ANY_TORCH") == "1"
TORCH_REQUIREMENT = "torch>=2.11,<2.16"
TRITON_REQUIREMENT = "triton>=3.2,<3.10"
INSTALL_REQUIRES = [
    "torch" if ANY_TORCH else TORCH_REQUIREMENT,
    "transformers>=5.17,<5.26",
    "safetensors>=0.4",
    "pillow>=10",
    "tqdm>=4.60",
    "numpy>=1.24",
    "pyyaml>=6",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "ruff>=0.15", "tensorboard>=2.14",
            "wandb>=0.18"],
    # --report_to (m2pt_fast/training/reporting.py): not installed by setup.sh unless dev
    "tensorboard": ["tensorboard>=2.14"],
    "wandb": ["wandb>=0.18"],
    "triton": ["triton" if ANY_TORCH else TRITON_REQUIREMENT],
    "bitsandbytes": ["bitsandbytes>=0.50,<0.51"],
    # deepspeed ships only an sdist; setup.sh builds it with DS_BUILD_OPS=0 (ops JIT-compile later).
    "deepspeed": ["deepspeed>=0.17,<0.20", "psutil>=5.9"],
    # --method lora (0.17 imports transformers' HybridCache, gone in transformers 5)
    "peft": ["peft>=0.18,<0.22"],
    # flash-attn has no wheel on the registry (CUDA source build): never required.
    "gpu": ["flash-attn>=2.6"],
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() if k != "gpu" for r in v})


def _say(msg: str) -> None:
    # stderr, so that pip shows it with -v and it is not mixed into captured stdout
    print(f"[m2pt-fast] {msg}", file=sys.stderr)


class CMakeExtension(Extension):
    """A library CMake builds; setuptools only decides where it lands."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class cmake_build_ext(build_ext):
    def build_extensions(self):
        mode = os.environ.get("M2PT_BUILD_NATIVE", "auto")
        missing = [tool for tool in ("cmake", os.environ.get("CXX", "c++")) if shutil.which(tool) is None]
        for ext in list(self.extensions):
            if mode == "0" or (missing and mode != "1"):
                why = "M2PT_BUILD_NATIVE=0" if mode == "0" else f"{' and '.join(missing)} not found"
                _say(f"native NF4 library skipped ({why}): NF4 quantization on the CPU uses PyTorch")
                self.extensions.remove(ext)
                continue
            try:
                self._cmake_build(ext)
                _say(f"native NF4 library built: {self.get_ext_fullpath(ext.name)}")
            except (OSError, subprocess.CalledProcessError) as exc:
                if mode == "1":
                    raise
                _say(f"native NF4 library build FAILED ({exc}); installing the pure-Python path")
                self.extensions.remove(ext)

    def _cmake_build(self, ext: CMakeExtension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # a cache from an earlier configure keeps that run's compiler and flags: start clean
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DM2PT_OUTPUT_DIR={out.parent}", f"-DM2PT_OUTPUT_NAME={out.name}"],
            check=True,
        )
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--target", ext.target, "-j", jobs], check=True)


setup(
    name="m2pt-fast",
    version="0.1.0",
    description="Kernel-optimized Multimodal Prompt Tuning (M²PT) for LLaVA-class models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["m2pt_fast", "m2pt_fast.*"]), "m2pt_kernels", "m2pt_kernels.reference"],
    package_dir={"m2pt_kernels": "kernels/m2pt_kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=[CMakeExtension("m2pt_kernels.libm2pt_nf4", target="m2pt_nf4")],
    cmdclass={"build_ext": cmake_build_ext},
)
