"""Zero-shot evaluation: the CLI, the benchmarks' files, the official scorers, a local judge, chat.
"""
