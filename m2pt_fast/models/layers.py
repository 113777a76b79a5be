"""Building blocks the model builders (llava.py) and the checkpoint loaders (llava_original.py,
quantize.py) share, kept below all three so that none imports another for them."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class LinearProjector(nn.Module):
    """The single linear interaction layer of the original LLaVA (v1), which transformers' Llava lacks."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set to `dtype` inside the block, restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
