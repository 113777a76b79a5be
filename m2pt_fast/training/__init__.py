"""The trainer: the recipe (setup -> step -> save), its options, checkpoints, the DeepSpeed config,
metrics reporting.
"""
