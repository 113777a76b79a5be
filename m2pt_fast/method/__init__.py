"""The method: M²PT's prompts and interaction layer on a frozen model, its two backends (the reference
form and the fused one), the attention route, generation, the baselines, the prompt file.
"""
