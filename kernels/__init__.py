"""m2pt_kernels: Triton kernels for prompt tuning, each with a pure-PyTorch reference and a CPU path.

Standalone: this package never imports m2pt_fast.
"""

__version__ = "0.1.0"
from .prefix_attention import prefix_attention  # noqa: F401
