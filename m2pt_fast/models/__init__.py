"""The frozen backbones: building and loading LLaVA in every layout people have, NF4 quantization,
the base model of a run. One file per model family.
"""
