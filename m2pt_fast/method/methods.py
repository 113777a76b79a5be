"""The paper's methods in one trainer: M²PT and its baselines, each a choice of what trains.

  m2pt     deep visual and textual prompts (+ the interaction layer, the projector)
  vpt      deep visual prompts only (+ the projector, as --tune_projector says)
  text_pt  deep textual prompts only (PTUM in the paper; + the projector likewise)
  lora     LoRA on the decoder's linear layers through PEFT (+ the projector as a module PEFT saves)
  full     the decoder (embeddings, layers, norm, lm_head) and the projector, trained in full

Every method is an M2PTLlava (prompts of length 0 where a method has none), so data, loss, DeepSpeed,
checkpoints and metrics are one code path. What differs: which parameters train (`apply_method`), what
the run leaves (`OUTPUT_NAMES`: a prompt file, a PEFT adapter directory, a model directory) and how it
loads back (`load_output`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from m2pt_fast import compat
from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.method.model import M2PTLlava, apply_m2pt
from m2pt_fast.method.prompt_io import load_prompts, save_prompts
from m2pt_fast.models.loading import load_model
from m2pt_fast.models.quantize import NF4Linear

METHODS = ("m2pt", "vpt", "text_pt", "lora", "full")
PROMPT_METHODS = ("m2pt", "vpt", "text_pt")
# What a run of each method leaves in its output directory (and each checkpoint, but `full`'s).
OUTPUT_NAMES = {"m2pt": "prompts.safetensors", "vpt": "prompts.safetensors", "text_pt": "prompts.safetensors",
                "lora": "adapter", "full": "model"}
DEFAULT_PROMPTS = 10
PAPER_LEARNING_RATE = 7e-4  # M²PT's, for prompts and projector alike
# a real model's default rate per method: the paper's for the prompt methods; LLaVA's own recipes for
# LoRA (finetune_lora.sh: 2e-4) and full fine-tuning (finetune.sh: 2e-5)
DEFAULT_LEARNING_RATES = {"m2pt": PAPER_LEARNING_RATE, "vpt": PAPER_LEARNING_RATE, "text_pt": PAPER_LEARNING_RATE,
                          "lora": 2e-4, "full": 2e-5}
# LLaVA's own LoRA recipe (scripts/v1_5/finetune_lora.sh): r 128, alpha 256, dropout 0.05, every linear
# layer of the decoder.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAVA_PROJECTOR = "multi_modal_projector"


@dataclass
class LoraSettings:
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS


def default_prompt_counts(method: str) -> tuple[int, int]:
    """(vision, text) prompt counts a method uses when none are given."""
    return {"m2pt": (DEFAULT_PROMPTS, DEFAULT_PROMPTS), "vpt": (DEFAULT_PROMPTS, 0),
            "text_pt": (0, DEFAULT_PROMPTS)}.get(method, (0, 0))


def check_method(method: str, num_vision_prompts: int, num_text_prompts: int, *, quant: str | None,
                 tune_lm_head: bool = False) -> None:
    """Refuse a method with settings it cannot run with, saying what would work (ValueError).

    A 4-bit backbone under ZeRO-3 (QLoRA there too) is refused for every method by
    ds_config.resolve_ds_config: ZeRO-3 would partition the packed weights."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {METHODS}, got {method!r}")
    if method == "vpt" and num_text_prompts:
        raise UserError(f"--method vpt tunes visual prompts only: drop --num_text_prompts {num_text_prompts} "
                        "(or use --method m2pt)")
    if method == "text_pt" and num_vision_prompts:
        raise UserError(f"--method text_pt tunes textual prompts only: drop --num_vision_prompts "
                        f"{num_vision_prompts} (or use --method m2pt)")
    if method in PROMPT_METHODS and not (num_vision_prompts or num_text_prompts):
        return  # the projector alone: M²PT's "no prompts" ablation (TrainConfig checks something trains)
    if method in ("lora", "full"):
        if num_vision_prompts or num_text_prompts:
            raise UserError(f"--method {method} trains no prompts: drop --num_vision_prompts/--num_text_prompts "
                            "(prompts with LoRA are not one of the paper's methods)")
        if tune_lm_head:
            raise UserError(f"--tune_lm_head with --method {method}: "
                            + ("full fine-tuning trains lm_head already" if method == "full"
                                else "LoRA here adapts the decoder's linear layers; use --method full"))
    if method == "full" and quant == "nf4":
        raise UserError("--method full cannot train a 4-bit backbone: use --quant bf16 (with --bf16) and ZeRO-3 "
                        "(--ds_config configs/zero3.json) to fit, or --method lora for QLoRA")


def projector_names(model) -> list[str]:
    """The interaction layer's module names, as PEFT matches them (the end of a module's name): LLaVA's
    projector, the Qwen models' merger and Qwen3-VL's deepstack mergers."""
    if model.family == "llava":
        return [LLAVA_PROJECTOR]
    visual = model.frozen_model.model.visual
    return ["merger", *(f"deepstack_merger_list.{i}" for i in range(len(getattr(visual, "deepstack_merger_list", []))))]


def lora_config(settings: LoraSettings, tune_projector: bool, projectors: list[str] = (LLAVA_PROJECTOR,)):
    """PEFT's LoraConfig for the decoder's linear layers (the vision tower and projector untouched;
    PEFT trains a copy of each `projectors` module when tune_projector)."""
    from peft import LoraConfig

    names = "|".join(settings.target_modules)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        # a regular expression (PEFT matches it against the whole module name): the decoder only
        target_modules=rf".*language_model\.layers\.\d+\..*\.({names})",
        modules_to_save=list(projectors) if tune_projector else None,
    )


def _register_nf4(config) -> None:
    """Let PEFT wrap our NF4Linear like a Linear: its forward is x -> base(x) + lora(x), which holds for
    any base layer with in_features/out_features (QLoRA on our 4-bit backbone)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    config._register_custom_module({NF4Linear: LoraLinear})


def apply_method(llava, method: str, *, num_vision_prompts: int = 0, num_text_prompts: int = 0,
                 tune_projector: bool = True, tune_lm_head: bool = False, backend: str = "reference",
                 lora: LoraSettings | None = None) -> M2PTLlava:
    """`llava` wrapped for training with `method`: only that method's parameters require grad.

    For lora, the PeftModel is kept as `model.peft_model` (it saves the adapter directory); the LLaVA
    inside it is `model.llava`, with PEFT's LoRA layers in place of the decoder's linear layers.
    """
    check_method(method, num_vision_prompts, num_text_prompts, quant=None, tune_lm_head=tune_lm_head)
    if method in ("lora", "full"):
        backend = "reference"  # no prompts: the reference forward is LLaVA's own
    model = apply_m2pt(llava, num_vision_prompts, num_text_prompts, tune_projector=tune_projector,
                       tune_lm_head=tune_lm_head, backend=backend, method=method)
    if method == "full":
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif method == "lora":
        from peft import get_peft_model

        config = lora_config(lora or LoraSettings(), tune_projector, projector_names(model))
        _register_nf4(config)
        # get_peft_model changes the LLaVA in place (model.llava stays the module that runs) and leaves
        # only the LoRA matrices and the modules_to_save copy of the projector trainable
        with compat.peft_wrapping():
            model.peft_model = get_peft_model(llava, config)
        device = model.vision_prompts.device  # PEFT cannot always tell an NF4 layer's device
        for name, param in llava.named_parameters():
            if "lora_" in name and param.device != device:
                param.data = param.data.to(device)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What a method trains, once apply_method has set requires_grad: the optimizer's parameters, the fp32
    masters the outputs are written from, the checkpoint's size estimate."""
    return [p for p in model.parameters() if p.requires_grad]


def save_output(model: M2PTLlava, path: str | os.PathLike, values=None, *, tokenizer=None,
                processor_dir: str | None = None) -> Path:
    """Write what a run of `model.method` leaves at `path` (OUTPUT_NAMES[method]); rank 0 only.

    values: {parameter: value to write instead}, e.g. the optimizer's fp32 masters after bf16 training.
    """
    path = Path(path)
    method = model.method
    if method in PROMPT_METHODS:
        return save_prompts(model, path, values)
    frozen = model.frozen_model
    state = {name: (values or {}).get(p, p).detach().cpu() for name, p in frozen.named_parameters()
             if p.requires_grad}
    if method == "lora":
        # PEFT picks the adapter's tensors (LoRA, the projector's trained copy) out of the whole state
        full = {f"base_model.model.{k}": v for k, v in _full_state(frozen, state).items()}
        model.peft_model.save_pretrained(str(path), state_dict=full, safe_serialization=True)
    else:
        frozen.save_pretrained(str(path), state_dict=_full_state(frozen, state), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        if processor_dir and (Path(processor_dir) / "preprocessor_config.json").is_file():
            shutil.copyfile(Path(processor_dir) / "preprocessor_config.json", path / "preprocessor_config.json")
    (path / "m2pt_method.json").write_text(json.dumps({"method": method}) + "\n")
    return path


def _full_state(llava: nn.Module, replaced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llava's state_dict with `replaced`'s entries in place of its own."""
    state = llava.state_dict()
    state.update(replaced)
    return state


def load_output(llava, path: str | os.PathLike, method: str | None = None, **prompt_counts) -> M2PTLlava:
    """A trained model from what a run left at `path`: its prompt file, PEFT adapter directory or model
    directory. `llava` is the base model (for full, ignored: the directory holds the whole model).

    method: read from the file itself where not given (an adapter or model directory says so).
    """
    path = Path(path)
    if method is None:
        marker = path / "m2pt_method.json" if path.is_dir() else None
        method = json.loads(marker.read_text())["method"] if marker and marker.is_file() else "m2pt"
    if method in PROMPT_METHODS:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        model = apply_m2pt(llava, int(meta.get("num_vision_prompts", 0)), int(meta.get("num_text_prompts", 0)),
                           tune_projector=meta.get("tune_projector") == "true",
                           tune_lm_head=meta.get("tune_lm_head") == "true",
                           official_vision_features=meta.get("official_vision_features") == "true", method=method,
                           **prompt_counts)
        load_prompts(model, path)
        return model
    if method == "lora":
        from peft import LoraConfig, PeftModel

        if not (path / "adapter_config.json").is_file():
            raise MissingInput(f"{path} has no adapter_config.json: not a PEFT adapter directory")
        config = LoraConfig.from_pretrained(str(path))
        _register_nf4(config)
        with compat.peft_wrapping():
            peft_model = PeftModel.from_pretrained(llava, str(path), config=config, is_trainable=False)
        model = apply_m2pt(llava, 0, 0, tune_projector=False, method="lora")
        model.peft_model = peft_model
        return model

    return apply_m2pt(load_model(str(path)), 0, 0, tune_projector=False, method="full")
