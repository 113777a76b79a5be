"""LLaVA checkpoints in LLaVA's own layout (haotian-liu/LLaVA), and the M²PT paper's assembly, loaded
into transformers' LlavaForConditionalGeneration from local files only.

Two sources:
  * a LLaVA directory: a LlavaLlamaForCausalLM whose config.json carries LLaVA's `mm_*` keys
    (`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_vision_tower`, ...)
    and whose weights are LLaMA's plus `model.mm_projector.*` (llava-v1.5-7b/13b, llava-v1-0719, and
    any model fine-tuned with LLaVA's code);
  * the paper's assembly: a plain LLaMA/Vicuna directory plus `pretrain_mm_mlp_adapter`, the
    `mm_projector.bin` (or .safetensors) of LLaVA's stage-1 pretraining, holding `model.mm_projector.*`.
Either way the vision tower comes from a local CLIP directory (`vision_tower`, or the config's
`mm_vision_tower` where that names a local directory): a whole CLIPModel as openai/clip-vit-large-patch14
(-336) holds it (its text half is not read) or a CLIPVisionModel alone. Vision weights inside a LLaVA
checkpoint (`model.vision_tower.*`) are not used: LLaVA's training keeps the tower frozen, as loaded
from that directory.

What the loader adds: LLaVA splices image features where its input holds IMAGE_TOKEN_INDEX (-200), a
value outside the vocabulary; transformers' Llava needs an image token inside it. The loader appends
one row to the input embeddings (zeros: the image token's embedding is never used, its positions are
replaced by image features) and gives that id, the old vocabulary size, to `config.image_token_id`.
lm_head keeps the original vocabulary's rows, so every logit LLaVA computes is computed unchanged and
no new one is added (text_config.vocab_size counts the embedding rows; lm_head has one fewer).
Tokenizers of these models lack "<image>": `add_image_token(tokenizer, model)` adds it with that id.

Mapping (LLaVA name -> transformers' Llava):
  model.embed_tokens / model.layers.* / model.norm    -> model.language_model.*
  lm_head.weight                                     -> lm_head.weight
  model.mm_projector.weight, .bias (linear)          -> model.multi_modal_projector.linear.*
  model.mm_projector.0.*, .2.* (mlp2x_gelu)           -> model.multi_modal_projector.linear_1.*, linear_2.*
  vision_model.* of the CLIP directory               -> model.vision_tower.(vision_model.)*
mm_vision_select_layer is transformers' vision_feature_layer; mm_vision_select_feature "patch" is its
"default" strategy (CLS dropped), "cls_patch" its "full".
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from m2pt_fast.compat import no_init_weights
from m2pt_fast.errors import UserError
from m2pt_fast.models.layers import LinearProjector, default_dtype
from m2pt_fast.models.quantize import NF4Linear
from m2pt_kernels.nf4_format import NF4Weight

SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# the LLaVA scripts' choices where a config does not say (the paper's LLaVA v1 was trained with these)
DEFAULT_SELECT_LAYER = -2
DEFAULT_SELECT_FEATURE = "patch"
IMAGE_TOKEN = "<image>"


class LlavaSourceError(UserError):
    """A LLaVA source that cannot be loaded: the message names what is missing or does not fit."""


def is_original_layout(config: dict) -> bool:
    """Whether a config.json is LLaVA's own (LlavaLlamaForCausalLM with mm_* keys), not transformers'."""
    architectures = config.get("architectures") or []
    return "LlavaLlamaForCausalLM" in architectures or ("mm_projector_type" in config or "mm_vision_tower" in config)


def is_plain_llama(config: dict) -> bool:
    return config.get("model_type") == "llama" and not is_original_layout(config)


def checkpoint_layout(config: dict, pretrain_mm_mlp_adapter: object = None) -> str:
    """How a model directory with this config.json loads, the one place that decides it: "original" for
    LLaVA's own layout, or a plain LLaMA that LLaVA's stage-1 projector assembles into one (the paper's),
    read by `load_original`; "transformers" for a transformers LLaVA directory."""
    assembled = pretrain_mm_mlp_adapter is not None or is_plain_llama(config)
    return "original" if is_original_layout(config) or assembled else "transformers"


# ------------------------------------------------------------------------------------------ files
def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(
        p for p in directory.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise LlavaSourceError(f"{directory} has no weights (*.safetensors or *.bin)")
    return files


def _keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """A safetensors file's tensor names and shapes from its header (nothing else read); None for .bin."""
    if path.suffix != ".safetensors":
        return None

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _index_keys(directory: Path) -> set[str] | None:
    """Every tensor name of a sharded checkpoint, from its index file, where there is one."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / name
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
    return None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# ------------------------------------------------------------------------------------ vision tower
def vision_tower_config(directory: str | os.PathLike) -> CLIPVisionConfig:
    """The vision config of a local CLIP directory (a CLIPModel's or a CLIPVisionModel's)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir() or not config_path.is_file():
        raise LlavaSourceError(f"vision tower {directory} is not a local model directory with a config.json "
                               "(nothing is downloaded: save openai/clip-vit-large-patch14(-336) there first)")
    config = json.loads(config_path.read_text())
    kind = config.get("model_type")
    if kind == "clip":
        vision = CLIPVisionConfig(**(config.get("vision_config") or {}))
    elif kind == "clip_vision_model":
        vision = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    else:
        raise LlavaSourceError(f"vision tower {directory} is a {kind!r} model, not CLIP (model_type 'clip' or "
                               "'clip_vision_model'): LLaVA's towers are CLIP ViTs")
    return vision


VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _tower_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The CLIP directory's vision transformer weights, by their names inside it (embeddings.*,
    encoder.*, ...): a CLIPModel's vision_model.* (its text half dropped), or a CLIPVisionModel's,
    saved with the vision_model. prefix or (transformers 5.24) without."""
    found = {}
    for path in weight_files(directory):
        for key, tensor in read_tensors(path).items():
            key = key[len("vision_model."):] if key.startswith("vision_model.") else key
            if key.startswith(VISION_PARTS):
                found[key] = tensor
    if not found:
        raise LlavaSourceError(f"vision tower {directory} holds no CLIP vision weights "
                               "(vision_model.* or embeddings.*)")
    return found


# --------------------------------------------------------------------------------------- projector
def _projector_type(keys, config_type: str | None) -> str:
    found = "mlp2x_gelu" if "model.mm_projector.0.weight" in keys else (
        "linear" if "model.mm_projector.weight" in keys else None)
    if found is None:
        raise LlavaSourceError("no projector weights: expected model.mm_projector.weight (linear) or "
                               "model.mm_projector.0.weight and .2.weight (mlp2x_gelu)")
    if config_type is not None and config_type != found:
        raise LlavaSourceError(f"mm_projector_type is {config_type!r} but the weights are a {found} projector")
    return found


def _projector_name(key: str, kind: str) -> str | None:
    rest = key[len("model.mm_projector."):]
    if kind == "linear":
        return f"model.multi_modal_projector.linear.{rest}"
    index, _, param = rest.partition(".")
    layer = {"0": "linear_1", "2": "linear_2"}.get(index)
    return f"model.multi_modal_projector.{layer}.{param}" if layer else None


def _check_projector(shapes: dict[str, tuple[int, ...]], kind: str, vision_width: int, text_width: int,
                     where: str) -> None:
    first = shapes.get("model.mm_projector.weight" if kind == "linear" else "model.mm_projector.0.weight")
    if first is None:
        return
    if tuple(first) != (text_width, vision_width):
        raise LlavaSourceError(f"{where}: the projector maps {first[1]} -> {first[0]} features but the vision "
                               f"tower gives {vision_width} and the decoder takes {text_width}: a projector for "
                               "another tower or decoder")


# ------------------------------------------------------------------------------------------ decoder
def _decoder_name(key: str) -> str | None:
    if key == "lm_head.weight":
        return key
    if key.startswith("model.mm_projector.") or key.startswith("model.vision_tower."):
        return None
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return None


def _text_config(config: dict, vocab_rows: int) -> LlamaConfig:
    keep = {k: v for k, v in config.items()
            if not k.startswith("mm_") and k not in ("architectures", "model_type", "auto_map", "transformers_version",
                                                     "image_aspect_ratio", "freeze_mm_mlp_adapter",
                                                     "tune_mm_mlp_adapter", "use_mm_proj", "image_grid_pinpoints")}
    keep["vocab_size"] = vocab_rows
    return LlamaConfig(**keep)


def _projector_source(path: Path, files: list[Path], adapter: Path | None):
    """(projector tensor names -> shapes, the adapter file's tensors, where they come from): from the
    adapter file (small, read whole) or the checkpoint's safetensors headers or index; an unindexed
    .bin checkpoint is read to find them (its keys are only known once it is read). A shape of ()
    means unknown until the weights stream in."""
    if adapter is not None:
        if not adapter.is_file():
            raise LlavaSourceError(f"pretrain_mm_mlp_adapter {adapter} does not exist")
        adapter_tensors = {k: v for k, v in read_tensors(adapter).items() if k.startswith("model.mm_projector.")}
        if not adapter_tensors:
            raise LlavaSourceError(f"{adapter} holds no model.mm_projector.* tensors (LLaVA's key names)")
        return {k: tuple(v.shape) for k, v in adapter_tensors.items()}, adapter_tensors, str(adapter)
    headers = [_keys_and_shapes(f) for f in files]
    if all(h is not None for h in headers):
        shapes = {k: s for h in headers for k, s in h.items()}
    elif (index := _index_keys(path)) is not None:
        shapes = {k: () for k in index}
    else:
        shapes = {k: tuple(v.shape) for f in files for k, v in read_tensors(f).items()
                  if k.startswith("model.mm_projector.")}
    return {k: s for k, s in shapes.items() if k.startswith("model.mm_projector.")}, {}, str(path)


# -------------------------------------------------------------------------------------------- load
def load_original(
    path: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    pretrain_mm_mlp_adapter: str | os.PathLike | None = None,
    mm_vision_select_layer: int | None = None,
    mm_vision_select_feature: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LlavaForConditionalGeneration:
    """A transformers LLaVA from a LLaVA-layout directory, or from a LLaMA directory + projector file
    (the paper's assembly). Every check runs on configs and file headers before the weights are read;
    the weights then stream in one file at a time."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    bnb_4bit = quantization.get("quant_method") == "bitsandbytes" and bool(
        quantization.get("load_in_4bit") or quantization.get("_load_in_4bit"))
    if quantization and not (bnb_4bit and quantization.get("bnb_4bit_quant_type", "fp4") == "nf4"):
        raise LlavaSourceError(f"{path} is quantized ({quantization.get('quant_method')}, "
                               f"{quantization.get('bnb_4bit_quant_type', 'not 4-bit')}) in LLaVA's own layout: only "
                               "bitsandbytes' 4-bit NF4 loads; start from the float checkpoint otherwise")
    if not (is_original_layout(config) or pretrain_mm_mlp_adapter is not None):
        raise LlavaSourceError(f"{path} is a plain {config.get('model_type')!r} model: give "
                               "pretrain_mm_mlp_adapter (LLaVA's mm_projector.bin) and vision_tower to assemble "
                               "a LLaVA from it")
    tower_dir = vision_tower or config.get("mm_vision_tower")
    if tower_dir is None or not Path(tower_dir).is_dir():
        raise LlavaSourceError(f"{path}: the vision tower {tower_dir!r} is not a local directory: pass "
                               "vision_tower (--vision_tower) naming a local CLIP directory")
    tower_dir = Path(tower_dir)
    vision = vision_tower_config(tower_dir)

    select_layer = mm_vision_select_layer if mm_vision_select_layer is not None else config.get(
        "mm_vision_select_layer", DEFAULT_SELECT_LAYER)
    select_feature = mm_vision_select_feature or config.get("mm_vision_select_feature", DEFAULT_SELECT_FEATURE)
    if select_feature not in SELECT_FEATURES:
        raise LlavaSourceError(f"mm_vision_select_feature {select_feature!r} is not one of {sorted(SELECT_FEATURES)}")

    files = weight_files(path)
    adapter = Path(pretrain_mm_mlp_adapter) if pretrain_mm_mlp_adapter is not None else None
    projector_shapes, adapter_tensors, where = _projector_source(path, files, adapter)
    kind = _projector_type(projector_shapes, config.get("mm_projector_type"))
    text_width = config["hidden_size"]
    _check_projector({k: s for k, s in projector_shapes.items() if s}, kind, vision.hidden_size, text_width, where)

    vocab = config["vocab_size"]
    llava_config = LlavaConfig(
        vision_config=vision, text_config=_text_config(config, vocab + 1), image_token_id=vocab,
        vision_feature_layer=select_layer, vision_feature_select_strategy=SELECT_FEATURES[select_feature],
        projector_hidden_act="gelu", multimodal_projector_bias=True,
    )
    llava_config.m2pt_linear_projector = kind == "linear"
    llava_config.m2pt_lm_head_rows = vocab  # saved with the config: m2pt_fast.models.quantize rebuilds this layout
    dtype = dtype or torch.float32
    llava_config._attn_implementation = "sdpa"
    with torch.device(device), default_dtype(dtype), no_init_weights():
        model = LlavaForConditionalGeneration(llava_config)
        if kind == "linear":
            model.model.multi_modal_projector = LinearProjector(vision.hidden_size, text_width)
        # the original vocabulary's logits only: lm_head keeps LLaVA's rows
        model.lm_head = nn.Linear(text_width, vocab, bias=False)
    # transformers builds each half in its config's dtype (a LLaMA config says float32), not the default;
    # parameters only: buffers such as RoPE's inv_freq stay in the precision transformers computes them
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)

    targets = model.state_dict()
    filled: set[str] = set()

    def put(name: str, tensor: torch.Tensor) -> None:
        target = targets[name]
        if name == "model.language_model.embed_tokens.weight":
            with torch.no_grad():
                target[:vocab].copy_(tensor)
                target[vocab:].zero_()  # the image token's row: never read (its positions hold image features)
        elif tuple(target.shape) != tuple(tensor.shape):
            raise LlavaSourceError(f"{name}: the checkpoint's tensor has shape {tuple(tensor.shape)}, the model's "
                                   f"{tuple(target.shape)}")
        else:
            with torch.no_grad():
                target.copy_(tensor)
        filled.add(name)

    quantized: dict[str, dict[str, torch.Tensor]] = {}  # bitsandbytes 4-bit layers: name -> weight.* tensors
    for file in files:
        for key, tensor in read_tensors(file).items():
            match = re.match(r"^(.*)\.weight(\..*)?$", key) if bnb_4bit else None
            if match and (match.group(2) or tensor.dtype == torch.uint8):  # packed codes and their statistics
                layer = _decoder_name(match.group(1) + ".weight")
                if layer is not None and layer in targets:
                    quantized.setdefault(layer[:-len(".weight")], {})["weight" + (match.group(2) or "")] = tensor
                    continue
            name = _decoder_name(key)
            if name is None and key.startswith("model.mm_projector.") and adapter is None:
                name = _projector_name(key, kind)
            if name is not None and name in targets:
                put(name, tensor)
    for layer, tensors in quantized.items():
        _set_nf4_layer(model, layer, tensors, path)
        filled.add(layer + ".weight")
    for key, tensor in adapter_tensors.items():
        name = _projector_name(key, kind)
        if name in targets:
            put(name, tensor)
    for name, tensor in _tower_tensors(tower_dir).items():
        # Llava's tower is a CLIPVisionModel: its state names the vision transformer vision_model.* in
        # some transformers releases, and leaves the prefix out in others
        for candidate in (f"model.vision_tower.vision_model.{name}", f"model.vision_tower.{name}"):
            if candidate in targets:
                put(candidate, tensor)
                break
    missing = sorted(set(targets) - filled)
    if missing:
        raise LlavaSourceError(f"{path}: no weights for {len(missing)} tensor(s) of the model, e.g. {missing[:4]}")
    return model.eval()


def _set_nf4_layer(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Replace the nn.Linear `name` by an NF4Linear holding a bitsandbytes 4-bit weight's tensors
    (transformers' serialization: `weight` packed, `weight.*` statistics), keeping its bias."""
    if "weight.quant_state.bitsandbytes__nf4" not in tensors:
        raise LlavaSourceError(f"{path}: {name}.weight is packed but has no quant_state.bitsandbytes__nf4 entry "
                               "(fp4, 8-bit or a truncated checkpoint?)")
    q = NF4Weight.from_bnb_state_dict(tensors, "weight")
    linear = model.get_submodule(name)
    if tuple(q.shape) != (linear.out_features, linear.in_features):
        raise LlavaSourceError(f"{path}: {name} holds a {tuple(q.shape)} weight, the model's is "
                               f"{(linear.out_features, linear.in_features)}")
    layer = NF4Linear.from_nf4(q, linear.bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def add_image_token(tokenizer, model: LlavaForConditionalGeneration) -> None:
    """Give a LLaVA tokenizer (which has no image token) "<image>" with the model's image_token_id."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.config.image_token_id:
            raise LlavaSourceError(f"the tokenizer's {IMAGE_TOKEN} is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}"
                                   f" but the model's image token is {model.config.image_token_id}")
        return
    if len(tokenizer) != model.config.image_token_id:
        raise LlavaSourceError(f"the tokenizer has {len(tokenizer)} tokens; the model's image token is id "
                               f"{model.config.image_token_id}: a tokenizer of another vocabulary")
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
