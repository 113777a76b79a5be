"""What differs between the transformers releases m2pt_fast supports, in one place.

Supported: transformers 5.17 through 5.25 (setup.py states the range; docs/compatibility.md lists what
was run). Everything else in m2pt_fast calls transformers through the names below, so a new release
that moves something again is fixed here, and `tests/test_compat.py` says what broke.

What moved, and when:
- 5.24 renamed the cache argument of every layer, model forward and mask helper from
  `past_key_values` to `cache`, and the cache field of every `ModelOutput` likewise. The old names
  still work there but warn ("deprecated ... removed in version 5.40.0"); passing the new name to an
  older release is worse than an error: its layers take **kwargs and ignore it, so nothing is cached.
  The release is told apart by the mask helper's signature, not by a version number.
- 5.24 checkpoints a `GradientCheckpointingLayer`'s `forward` rather than its `__call__`; both read
  the same two attributes (`gradient_checkpointing`, `_gradient_checkpointing_func`), set here.
- 5.25 kernelizes every model `from_pretrained` loads unless told not to (`use_kernels` defaults to
  True): it needs the `kernels` package, and where that is installed it may replace layers (RMSNorm,
  MLPs, attention) with kernels fetched from the hub, the very classes our attention route and lean
  modules recognise. `from_pretrained` here always passes `use_kernels=False`, which every supported
  release takes (5.17 through 5.24 default it to False).
- 5.24 deprecates `is_gradient_checkpointing` (FutureWarning), which PEFT asks for while it wraps a
  model; `peft_wrapping` silences that one warning.
- Some releases build an image processor directory's default (torchvision) class in
  `AutoImageProcessor` and fail without torchvision; the PIL class of the same name reads the same
  config (`load_image_processor`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoImageProcessor, CLIPImageProcessorPil, masking_utils
from transformers.cache_utils import Cache, DynamicCache
from transformers.initialization import no_init_weights
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import rotate_half

__all__ = [
    "CACHE_KWARG",
    "CLIPImageProcessorPil",
    "Cache",
    "GradientCheckpointingLayer",
    "cache_kwargs",
    "causal_mask",
    "deepspeed_cpu_comm_without_shm",
    "from_pretrained",
    "layer_types",
    "load_image_processor",
    "new_cache",
    "no_init_weights",
    "peft_wrapping",
    "rotate_half",
    "set_layer_checkpointing",
]

# The keyword transformers' decoder layers and mask helpers take their KV cache under.
CACHE_KWARG = ("cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters
               else "past_key_values")


def cache_kwargs(cache: Cache | None) -> dict:
    """{name: cache} under the installed release's name, for a layer or model forward call."""
    return {CACHE_KWARG: cache}


def new_cache(config) -> DynamicCache:
    """An empty KV cache laid out for `config` (a decoder config)."""
    return DynamicCache(config=config)


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None,
                position_ids: torch.Tensor, sliding: bool = False):
    """transformers' causal mask for the model's attention implementation (None where it needs none);
    with `sliding`, the sliding-window causal mask of config.sliding_window.

    inputs_embeds: (B, T, d) the new tokens; attention_mask: (B, T_past + T) 1/0; position_ids: (B, T).
    """
    build = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    return build(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=position_ids, **cache_kwargs(cache))


def layer_types(config) -> list[str]:
    """Each decoder layer's attention, "full_attention" or "sliding_attention", as its model's forward
    picks the mask: config.layer_types where the config has them (Qwen2, Gemma 2/3), else every layer
    sliding when config.sliding_window is set (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def set_layer_checkpointing(layer: GradientCheckpointingLayer, enabled: bool, recompute) -> None:
    """Turn a transformers layer's own activation checkpointing on or off; `recompute(fn, *args)`
    runs fn and recomputes it in backward (e.g. torch.utils.checkpoint.checkpoint)."""
    layer.gradient_checkpointing = enabled
    layer._gradient_checkpointing_func = recompute


def from_pretrained(model_class, path, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` from local files only, with transformers' own
    layers: never kernelized (5.25's default), so nothing is fetched and no layer class is swapped."""
    return model_class.from_pretrained(path, local_files_only=True, use_kernels=False, **kwargs)


def load_image_processor(model_dir: str):
    """The image processor saved in `model_dir` (its preprocessor_config.json), from local files only."""
    try:
        return AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:
        config = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        kind = config.get("image_processor_type", "")
        pil_class = getattr(transformers, kind.removesuffix("Fast").removesuffix("Pil") + "Pil", None)
        if pil_class is None:
            raise
        return pil_class.from_pretrained(model_dir, local_files_only=True)


@contextlib.contextmanager
def peft_wrapping():
    """Around PEFT's wrapping of a model: without transformers' deprecation of is_gradient_checkpointing
    (5.24 on), which PEFT reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def deepspeed_cpu_comm_without_shm() -> None:
    """Keep DeepSpeed's shared-memory all-reduce op out of a CPU run; gloo's all-reduce does the work.

    DeepSpeed (0.17 to 0.19) compiles that op on the first init_distributed of a CPU run, a C++ build
    that costs minutes and a few GB of memory on a small machine, and each process then leaves a 66 MB
    segment in /dev/shm (deepspeed_allreduce_buffer_*) that nothing unlinks: a test suite's runs fill
    the machine's memory with them. Whether DeepSpeed uses the op is read from this table.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
