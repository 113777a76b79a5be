"""Make the installed Triton interpreter (TRITON_INTERPRET=1) able to run this library's kernels.

The interpreter turns a tensor into a Python int, as a runtime loop bound such as
`range(0, prefix_len, BLOCK_P)` needs, with int() on the tensor's numpy array, and it holds every
scalar kernel argument as a one-element 1-D array. numpy >= 2.4 refuses int() on any array that is
not 0-d ("only 0-dimensional arrays can be converted to Python scalars"); triton fixed this in 3.7
by squeezing the array first (triton-lang/triton#9171). With an older triton and a newer numpy
every kernel here fails in the interpreter, since each loops to a runtime bound; compiled kernels
on a GPU are unaffected.

`prepare()` runs a one-loop kernel; if it fails, the same squeeze is installed on the interpreter's
tensor patch and the probe is run again. Detected by behaviour rather than by version numbers, so
it stays out of the way on any triton and numpy pair that already works.
"""
import functools

import triton
from triton.runtime import interpreter as _triton_interpreter


@triton.jit
def _loop_to_runtime_bound(n):
    for _ in range(0, n):
        pass


def _probe() -> bool:
    try:
        _loop_to_runtime_bound[(1,)](2)
    except Exception:  # the interpreter wraps the TypeError in its InterpreterError
        return False
    return True


def _index_as_int(tensor) -> int:
    return int(tensor.handle.data.squeeze())


def _install_squeezing_index() -> None:
    original = getattr(_triton_interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_m2pt_squeezes", False):
        return

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:
            # triton >= 3.6 patches through a scope that undoes every change after the launch
            scope[0].set_attr(tensor, "__index__", _index_as_int)
        else:
            tensor.__index__ = _index_as_int

    patch_lang_tensor._m2pt_squeezes = True
    # _patch_lang looks this name up in the module at every launch
    _triton_interpreter._patch_lang_tensor = patch_lang_tensor


@functools.cache
def prepare() -> None:
    """Raises RuntimeError, saying what to change, when the interpreter cannot run the kernels."""
    if _probe():
        return
    _install_squeezing_index()
    if not _probe():
        import numpy

        raise RuntimeError(
            f"The Triton interpreter (TRITON_INTERPRET=1) of triton {triton.__version__} cannot run "
            f"loops to a runtime bound with numpy {numpy.__version__} (triton-lang/triton#9171), and "
            "m2pt_kernels could not work around it. Install triton>=3.7 or numpy<2.4, or unset "
            "TRITON_INTERPRET to use the PyTorch path on the CPU."
        )
