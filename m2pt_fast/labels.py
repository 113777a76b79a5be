"""The label of a position without loss: -100, the `ignore_index` of PyTorch's cross-entropy, which
transformers' models and LLaVA's data code both use. The data encoder writes it, both backends' losses
skip it; this is its one definition."""

IGNORE_INDEX = -100
