"""m2pt_kernels: Triton kernels for prompt tuning, each with a pure-PyTorch reference and a CPU path.

Standalone: this package never imports m2pt_fast. Where it lives and how Python finds it:
kernels/README.md.
"""
__version__ = "0.1.0"

from .nf4 import nf4_dequantize, nf4_linear, nf4_quantize  # noqa: F401
from .nf4_format import NF4Weight  # noqa: F401
from .prefix_attention import prefix_attention  # noqa: F401
