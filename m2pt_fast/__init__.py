"""m2pt-fast: Multimodal Prompt Tuning (M²PT) for LLaVA-class models."""

from .builders import NAMED_CONFIGS, build_llava, llava_config, load_llava
from .model import M2PTConfig, M2PTLlava, M2PTOutput, apply_m2pt
from .prompt_io import load_prompts, save_prompts
from .report import TrainableReport, trainable_report

__version__ = "0.1.0"

__all__ = [
    "NAMED_CONFIGS", "build_llava", "llava_config", "load_llava",
    "M2PTConfig", "M2PTLlava", "M2PTOutput", "apply_m2pt",
    "load_prompts", "save_prompts",
    "TrainableReport", "trainable_report",
]
