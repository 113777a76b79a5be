"""Where an op runs: the Triton kernel or the pure-PyTorch reference.

Triton kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(TRITON_INTERPRET=1, a numpy simulation used by the tests). Any other CPU call takes the reference
path. The interpreter must be chosen before triton is first imported, so the environment variable is
read here at call time but has to be set by the caller at start-up.
"""
import contextlib
import os

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_META_AS_KERNELS = False


@contextlib.contextmanager
def meta_as_kernels():
    """Inside, meta tensors take the kernels' path, as CUDA tensors would: each op then allocates
    exactly what its kernel allocates (its registered fake implementation's outputs), so the CUDA
    peak of a step can be counted on meta (m2pt_fast.planning.memory). Outside, meta tensors run the
    references, whose matmuls FLOP counters see."""
    global _META_AS_KERNELS
    previous, _META_AS_KERNELS = _META_AS_KERNELS, True
    try:
        yield
    finally:
        _META_AS_KERNELS = previous


def meta_takes_kernels(*tensors: torch.Tensor) -> bool:
    """True for meta tensors inside meta_as_kernels()."""
    return _META_AS_KERNELS and {t.device.type for t in tensors if t is not None} == {"meta"}


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors (all on one device)."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return triton_available()
    if devices == {"cpu"}:
        return interpreter_enabled() and triton_available()
    return False


@contextlib.contextmanager
def launching_on(device: torch.device):
    """Wrap every kernel launch on tensors of `device`.

    CUDA: Triton launches on the *current* device, which need not be the tensors' (cuda:1 tensors
    while cuda:0 is current would be an illegal memory access), so the launch is put under that
    device's guard, as torch's own kernels are. Interpreter: checks once that this triton and numpy
    can run the kernels, and works around it where they cannot (see _interpreter.py). Launchers use
    it, not use_triton(): torch.compile traces use_triton() but not the custom ops' insides.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
        return
    if interpreter_enabled():
        from . import _interpreter  # defines a jitted probe, so only once the interpreter is known on

        _interpreter.prepare()
    yield
