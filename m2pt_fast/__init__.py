"""m2pt-fast: Multimodal Prompt Tuning (M²PT) for LLaVA-class models."""

from .builders import NAMED_CONFIGS, build_llava, llava_config, load_llava
from .errors import MissingInput, UserError
from .model import M2PTConfig, M2PTLlava, M2PTOutput, apply_m2pt
from .prompt_io import PromptFileError, load_prompts, save_prompts
from .prompt_tuning import DeepTextPrompts, DeepVisionPrompts
from .quantize import QuantizeConfig, load_quantized, quantize_model, save_quantized
from .report import TrainableReport, trainable_report

__version__ = "0.1.0"

__all__ = [
    "NAMED_CONFIGS", "build_llava", "llava_config", "load_llava",
    "MissingInput", "UserError",
    "M2PTConfig", "M2PTLlava", "M2PTOutput", "apply_m2pt",
    "PromptFileError", "load_prompts", "save_prompts",
    "DeepTextPrompts", "DeepVisionPrompts",
    "QuantizeConfig", "load_quantized", "quantize_model", "save_quantized",
    "TrainableReport", "trainable_report",
]
