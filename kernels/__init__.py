"""m2pt_kernels: Triton kernels for prompt tuning, each with a pure-PyTorch reference and a CPU path.

Standalone: this package never imports m2pt_fast.
"""
if __name__ == "m2pt_kernels":
    __version__ = "0.1.0"
    from .nf4 import nf4_dequantize, nf4_linear, nf4_quantize  # noqa: F401
    from .nf4_format import NF4Weight  # noqa: F401
    from .prefix_attention import prefix_attention  # noqa: F401
# Otherwise this directory was found as a top-level `kernels`, because the repository root is on
# sys.path (`python -m ...` run from it). That name belongs to the Hugging Face kernel-hub package,
# which transformers and bitsandbytes probe for by importing it: stay empty, so their probes find
# nothing usable and the torch custom ops are not registered a second time by a second copy.
