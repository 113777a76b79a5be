"""The prompt file: every tuned tensor of an M²PT model in one safetensors file.

Layout (other tools read it; documented in the README):
  vision_prompts        (Lv, n_v, d_vision)
  text_prompts          (Lt, n_t, d_text)
  projector.<name>      the projector's state_dict entries, when the projector is tuned
  lm_head.<name>        lm_head's state_dict entries, when lm_head is tuned
Every tensor is fp32, whatever the model's dtype: after bf16 training the trainer passes the
optimizer's fp32 master values (m2pt_fast/training/master_weights.py), and a bf16 tensor widens to fp32 exactly.
Metadata (strings): format="m2pt-prompts", format_version, the model family ("llava", "qwen2_5_vl",
"qwen3_vl"; absent in older files: llava), the prompt counts, layer counts and widths, LLaVA's vision
feature layer(s) and selection strategy, which groups were tuned, and official_vision_features (the
released code's feature selection; absent in older files: false). For the Qwen models `projector.`
holds the interaction layer: Qwen2.5-VL's merger; Qwen3-VL's merger.* and deepstack_merger_list.*.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m2pt_fast.errors import MissingInput, UserError

FORMAT = "m2pt-prompts"
FORMAT_VERSION = "1"


def _settings(model) -> dict[str, str]:
    llava = {}
    if model.family == "llava":
        config = model.llava.config
        llava = {"vision_feature_layer": json.dumps(config.vision_feature_layer),
                 "vision_feature_select_strategy": str(config.vision_feature_select_strategy)}
    return {
        "family": model.family,
        "num_vision_prompts": str(model.num_vision_prompts),
        "num_text_prompts": str(model.num_text_prompts),
        "vision_prompt_layers": str(model.vision_prompts.shape[0]),
        "text_prompt_layers": str(model.text_prompts.shape[0]),
        "vision_hidden_size": str(model.vision_prompts.shape[2]),
        "text_hidden_size": str(model.text_prompts.shape[2]),
        **llava,
        "tune_projector": str(model.m2pt_config.tune_projector).lower(),
        "tune_lm_head": str(model.m2pt_config.tune_lm_head).lower(),
        "official_vision_features": str(model.m2pt_config.official_vision_features).lower(),
    }


def _tuned_tensors(model) -> dict[str, torch.Tensor]:
    """{file key: the model's parameter (or buffer) itself}."""
    tensors = {"vision_prompts": model.vision_prompts, "text_prompts": model.text_prompts}
    if model.m2pt_config.tune_projector:
        tensors.update({f"projector.{k}": v for k, v in model.projector.state_dict(keep_vars=True).items()})
    if model.m2pt_config.tune_lm_head:
        tensors.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict(keep_vars=True).items()})
    return tensors


def save_prompts(model, path: str | os.PathLike,
                 values: Mapping[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write the tuned tensors of an M2PTLlava or M2PTQwenVL to `path` (safetensors, fp32). Returns the path.

    values: {parameter of `model`: the value to write in its place}, e.g. the optimizer's fp32
    master copies of parameters trained in bf16 (m2pt_fast.training.master_weights.fp32_master_values).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = values or {}
    tensors = {k: values.get(v, v).detach().to("cpu", torch.float32).contiguous()
               for k, v in _tuned_tensors(model).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **_settings(model)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file behind
        raise
    os.replace(tmp, path)  # a crash mid-write leaves any earlier file intact
    return path


class PromptFileError(UserError):
    """A prompt file that cannot be read, or does not fit the model it is loaded into."""


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise PromptFileError(f"{str(path)!r} is not an m2pt prompt file "
                                      f"(metadata format={metadata.get('format')!r})")
            return metadata, {k: f.get_tensor(k) for k in f.keys()}
    except PromptFileError:
        raise
    except Exception as exc:  # safetensors raises its own error type (and OSError) for unreadable files
        raise PromptFileError(f"cannot read prompt file {str(path)!r}: {exc} (a truncated or overwritten file, "
                              "or not a safetensors file; save_prompts writes them)") from exc


def load_prompts(model, path: str | os.PathLike) -> dict[str, str]:
    """Restore tuned tensors saved by `save_prompts` into `model`; returns the file's metadata.

    Raises PromptFileError (a ValueError) naming the problem when the file cannot be read, lacks a
    tensor its metadata promises, or was made for another model shape or prompt count; nothing in the
    model changes in that case.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"prompt file {str(path)!r} does not exist")
    metadata, tensors = _read(path)

    expected = _settings(model)
    family = metadata.get("family", "llava")
    if family != expected["family"]:
        raise PromptFileError(f"prompt file {str(path)!r} was trained on a {family} model; "
                              f"this is a {expected['family']}")
    checked = ("num_vision_prompts", "num_text_prompts", "vision_prompt_layers", "text_prompt_layers",
               "vision_hidden_size", "text_hidden_size")
    problems = [f"{k}: file {metadata.get(k)}, model {expected[k]}" for k in checked if metadata.get(k) != expected[k]]
    # files from before the setting existed hold the method's selection
    official = metadata.get("official_vision_features", "false")
    if official != expected["official_vision_features"]:
        problems.append(f"official_vision_features: file {official}, model {expected['official_vision_features']} "
                        "(apply_m2pt(..., official_vision_features=...) must match how the prompts were trained)")
    targets = {"vision_prompts": model.vision_prompts, "text_prompts": model.text_prompts}
    targets.update({f"projector.{k}": v for k, v in model.projector.state_dict(keep_vars=True).items()})
    targets.update({f"lm_head.{k}": v for k, v in model.lm_head.state_dict(keep_vars=True).items()})
    for name, tensor in tensors.items():
        if name not in targets:
            problems.append(f"{name}: in the file but the model has no such tensor")
        elif tuple(tensor.shape) != tuple(targets[name].shape):
            problems.append(f"{name}: file shape {tuple(tensor.shape)}, model shape {tuple(targets[name].shape)}")
    promised = ["vision_prompts", "text_prompts"]
    for flag, prefix, module in (("tune_projector", "projector.", model.projector),
                                 ("tune_lm_head", "lm_head.", model.lm_head)):
        if metadata.get(flag) == "true":
            promised += [prefix + k for k in module.state_dict()]
    for name in promised:
        if name not in tensors:
            problems.append(f"{name}: missing from the file" + (
                "" if name.endswith("_prompts") else " (its metadata says that part was tuned)"))
    if problems:
        raise PromptFileError(f"prompt file {str(path)!r} does not fit this model:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return metadata
