"""What every deep-prompt model here shares: the configuration of what trains, the output, the
switchable backend, activation checkpointing of the frozen layers and the prompts' initialisation.

The models themselves: M2PTLlava (model.py), M2PTQwenVL (qwen_vl.py), DeepVisionPrompts /
DeepTextPrompts (prompt_tuning.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from m2pt_fast.compat import Cache, GradientCheckpointingLayer, set_layer_checkpointing
from m2pt_fast.errors import UserError
from m2pt_fast.method import fused, reference
from m2pt_fast.method.lean_activations import set_lean

BACKENDS = ("reference", "fused")


@dataclass
class M2PTConfig:
    """What M²PT tunes. Validated on construction."""

    num_vision_prompts: int = 10
    num_text_prompts: int = 10
    tune_projector: bool = True
    tune_lm_head: bool = False
    # The released M²PT code's vision feature selection instead of the method's (docs/method.md):
    # for converted official prompts. Off by default.
    official_vision_features: bool = False
    # Which of the paper's methods this model trains as (method/methods.py: apply_method checks it and
    # sets what trains; save_output writes that method's output).
    method: str = "m2pt"

    def __post_init__(self):
        for name in ("num_vision_prompts", "num_text_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a non-negative integer (0 disables those prompts), got {value!r}")
        for name in ("tune_projector", "tune_lm_head", "official_vision_features"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class M2PTOutput(ModelOutput):
    """`logits`: (B, T, V) for the text positions only (prompt positions removed), or None where the
    fused backend was not asked for them (it skips full-vocabulary logits when training).

    A transformers ModelOutput (also a dict): DeepSpeed ZeRO-3 finds the tensors a module returns only
    in tuples, lists and dicts, and re-gathers the prompts for backward through hooks on them.
    `cache`: the KV cache to pass to the next call (transformers' own name for it since 5.24)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None


class PromptTuned:
    """What every deep-prompt model here shares: a `backend` attribute ("reference" or "fused") that
    can be switched between calls (the fused one also runs the frozen model's norms and MLP
    activations through m2pt_fast.method.lean_activations), and activation checkpointing of the frozen model's layers.
    Subclasses name that model in `frozen_model`."""

    frozen_model: nn.Module
    backends: tuple[str, ...] = BACKENDS  # those this model runs

    def gradient_checkpointing_enable(self, every_n_layers: int = 1) -> None:
        """Recompute every (n-th) transformer layer in backward instead of storing activations."""
        set_gradient_checkpointing(self.frozen_model, every_n_layers)

    def gradient_checkpointing_disable(self) -> None:
        set_gradient_checkpointing(self.frozen_model, None)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self.backends:
            if value in BACKENDS:
                raise UserError(f"{type(self).__name__} runs the {' and '.join(self.backends)} backend only, "
                                f"not {value!r}")
            raise UserError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        frozen = getattr(self, "frozen_model", None)
        if frozen is not None:  # the fused path's norms and activations save less (lean_activations.py)
            set_lean(frozen, value == "fused")


class MultimodalPromptTuned(PromptTuned):
    """What M²PT's models share beyond PromptTuned (M2PTLlava, M2PTQwenVL): `m2pt_config` (an
    M2PTConfig), `vision_prompts` (Lv, n_v, d_vision) and `text_prompts` (Lt, n_t, d_text)."""

    m2pt_config: M2PTConfig

    @property
    def method(self) -> str:
        return self.m2pt_config.method

    @property
    def num_vision_prompts(self) -> int:
        return self.vision_prompts.shape[1]

    @property
    def num_text_prompts(self) -> int:
        return self.text_prompts.shape[1]

def set_gradient_checkpointing(root: nn.Module, every_n_layers: int | None) -> None:
    """Turn activation checkpointing on for every n-th transformer layer under `root` (None: off).

    Sets the flags transformers' GradientCheckpointingLayer reads, which the reference path runs
    through and the fused path consults, rather than calling the model's own enable method: its name
    and arguments changed within transformers 5 (activation_checkpointing_enable, every_n_layers).
    """
    if every_n_layers is not None and (isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int)
                                       or every_n_layers < 1):
        raise UserError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
    recompute = functools.partial(checkpoint, use_reentrant=False)
    layers = [m for m in root.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        set_layer_checkpointing(layer, every_n_layers is not None and index % every_n_layers == 0, recompute)


def xavier_uniform_per_layer(prompts: torch.Tensor) -> None:
    """Xavier-uniform init of each layer's (n, d) prompt matrix, as the paper's code does."""
    _, n, d = prompts.shape
    if n == 0 or d == 0:
        return
    bound = math.sqrt(6.0 / (n + d))
    with torch.no_grad():
        prompts.uniform_(-bound, bound)


def register_prompts(module: nn.Module, name: str, prompts: torch.Tensor) -> None:
    """One side's prompts (layers, n, d) on `module`: a Parameter, or, with 0 prompts, an empty buffer
    (nothing to train, and ZeRO-3 cannot partition a parameter of 0 elements)."""
    if prompts.shape[1] == 0:
        module.register_buffer(name, prompts, persistent=False)
    else:
        setattr(module, name, nn.Parameter(prompts))


def text_forward(model, embeds, attention_mask, labels, position_ids, cache, use_cache, return_logits,
                 deepstack=None):
    """The decoder half shared by M²PT and plain deep text prompts: `model` has `backend`,
    `training`, `text_prompts`, `language_model` and `lm_head`; embeds: (B, T, d); deepstack: Qwen3-VL's
    (image-token mask (B, T), [features added after decoder layer k]) or None."""
    lm, lm_head, prompts = model.language_model, model.lm_head, model.text_prompts
    if model.backend == "reference":
        loss, logits, cache = reference.text_forward(lm, lm_head, prompts, embeds, attention_mask, labels,
                                                     position_ids, cache, use_cache, deepstack)
        return M2PTOutput(loss=loss, logits=logits, cache=cache)
    if use_cache or cache is not None:
        # Decoding: the prompt K/V enter the cache once, computed for the whole batch; the text then
        # runs through the cached path.
        if cache is None or cache.get_seq_length() == 0:
            cache = fused.prompt_cache(lm, prompts, embeds.shape[0], cache)
        loss, logits, cache = reference.text_forward(lm, lm_head, prompts, embeds, attention_mask, labels,
                                                     position_ids, cache, True, deepstack)
        return M2PTOutput(loss=loss, logits=logits, cache=cache)
    if return_logits is None:
        return_logits = labels is None
    loss, logits = fused.text_forward(lm, lm_head, prompts, embeds, attention_mask, labels, position_ids,
                                      return_logits, deepstack)
    return M2PTOutput(loss=loss, logits=logits)
