"""m2pt-fast: Multimodal Prompt Tuning (M²PT) for LLaVA-class models."""

__version__ = "0.1.0"
