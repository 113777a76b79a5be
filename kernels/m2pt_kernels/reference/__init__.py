"""Pure-PyTorch references for every kernel in m2pt_kernels.

These are the oracles the tests and benchmarks compare against and the CPU fallback paths; they
favour plainness over speed. One submodule per op; everything is re-exported here.
"""
from .attention import prefix_attention_mask, prefix_attention_reference  # noqa: F401
from .nf4 import nf4_dequantize_reference, nf4_linear_reference, nf4_quantize_reference  # noqa: F401
