"""m2pt-fast: Multimodal Prompt Tuning (M²PT) for LLaVA-class models."""

from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.method.model import M2PTLlava, apply_m2pt
from m2pt_fast.method.prompt_io import PromptFileError, load_prompts, save_prompts
from m2pt_fast.method.prompt_tuning import DeepTextPrompts, DeepVisionPrompts
from m2pt_fast.method.prompted import M2PTConfig, M2PTOutput
from m2pt_fast.method.report import TrainableReport, trainable_report
from m2pt_fast.models.llava import NAMED_CONFIGS, build_llava, llava_config, load_llava
from m2pt_fast.models.quantize import QuantizeConfig, load_quantized, quantize_model, save_quantized

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
