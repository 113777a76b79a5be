"""The M²PT model: deep visual and textual prompts around a frozen transformers LLaVA.

`apply_m2pt` wraps a `LlavaForConditionalGeneration` in an `M2PTLlava`. The wrapped model's weights
are shared, not copied; only the prompts, the projector (the interaction layer) and optionally lm_head
are trainable.

The "reference" backend computes the reference form of docs/method.md, step by step:
- vision: the prompt rows `vision_prompts[0]` are prepended to the embedded patch sequence after
  CLIP's pre-layernorm; before vision layer i > 0 they are overwritten with `vision_prompts[i]`; the
  selected hidden state drops the prompt rows *and* CLS (strategy "default");
- text: `text_prompts[0]` is prepended to the input embeddings (before BOS); the attention mask gains
  n_t ones, positions shift by n_t, labels gain n_t × -100; before decoder layer j > 0 the prompt rows
  are overwritten with `text_prompts[j]`.
It is the oracle every fast path is checked against, so it favours plainness over speed
(m2pt_fast/method/reference.py). The "fused" backend computes the same function with the prompts as
batch-shared prefix K/V inside the model's own attention (m2pt_fast/method/attention.py) and a loss over
answer tokens only (m2pt_fast/method/fused.py).
`backend` can be switched between calls on the same object.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from m2pt_fast.compat import Cache
from m2pt_fast.errors import UserError
from m2pt_fast.method import fused, reference
from m2pt_fast.method.attention import route_attention
from m2pt_fast.method.generation import generate
from m2pt_fast.method.prompted import (
    M2PTConfig,
    M2PTOutput,
    MultimodalPromptTuned,
    register_prompts,
    text_forward,
    xavier_uniform_per_layer,
)
from m2pt_fast.method.qwen_vl import M2PTQwenVL


def clip_parts(clip_model: nn.Module) -> nn.Module:
    """The module holding a vision tower's embeddings, encoder and (CLIP) pre_layrnorm: a
    CLIPVisionModel or a SiglipVisionModel."""
    # transformers 5 puts them on CLIPVisionModel itself; earlier layouts nest them in .vision_model.
    return getattr(clip_model, "vision_model", clip_model)


def vision_states(model, tower: nn.Module, pixel_values: torch.Tensor, prompts: torch.Tensor,
                  depth: int) -> list[torch.Tensor]:
    """CLIP states after 0..depth encoder layers (prompt rows removed), by `model`'s backend.

    tower: the clip_parts of a CLIP or SigLIP vision model; pixel_values (B, 3, H, W); prompts
    (>= depth, n, d). The prompts join the sequence where the encoder layers start: after CLIP's
    pre-layernorm (SigLIP has none).
    """
    hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
    if hasattr(tower, "pre_layrnorm"):
        hidden = tower.pre_layrnorm(hidden)  # (B, [CLS +] patches, d)
    if model.backend == "fused":
        return fused.clip_states(tower, hidden, prompts, depth)
    return reference.clip_states(tower, hidden, prompts, depth)


def feature_layer_indices(llava: LlavaForConditionalGeneration) -> list[int]:
    """The hidden-state indices LLaVA selects, as non-negative numbers of vision layers run.

    hidden_states[k] is the state after k encoder layers (k = 0: the pre-layernorm output), so
    layer -2 of a 24-layer tower is index 23: 23 layers run, and 23 prompt sets can affect it.
    """
    config = llava.config
    num_layers = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    indices = [layer if layer >= 0 else num_layers + 1 + layer for layer in layers]
    for layer, index in zip(layers, indices):
        if not 0 <= index <= num_layers:
            raise UserError(f"vision_feature_layer {layer} is outside a {num_layers}-layer vision tower")
    return indices


def _official_feature_layer(llava: LlavaForConditionalGeneration, indices: list[int]) -> int:
    """The one layer whose input the released code's feature selection reads (its prompts written in)."""
    layers = llava.config.vision_config.num_hidden_layers
    if len(indices) != 1 or not 0 <= indices[0] < layers:
        raise UserError(f"official_vision_features reads one vision layer's input with its prompts: it needs a "
                        f"single vision_feature_layer before the last layer's output, got {indices}")
    return indices[0]


class M2PTLlava(MultimodalPromptTuned, nn.Module):
    """A frozen LLaVA with deep visual prompts, deep textual prompts and a trainable projector.

    Parameters of its own:
      vision_prompts: (Lv, n_v, d_vision), one set per vision layer that can affect the selected features
      text_prompts:   (Lt, n_t, d_text), one set per decoder layer
    """

    def __init__(self, llava: LlavaForConditionalGeneration, config: M2PTConfig, backend: str = "reference"):
        super().__init__()
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError("apply_m2pt takes a transformers LlavaForConditionalGeneration, "
                            "Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration, "
                            f"got {type(llava).__name__}")
        self.llava = llava
        self.m2pt_config = config
        # under --method lora: the PeftModel around self.llava (methods.apply_method makes it; it saves
        # the adapter directory)
        self.peft_model = None
        self.backend = backend
        route_attention(llava)  # the fused backend's prefix K/V go through transformers' attention interface

        vision = clip_parts(llava.model.vision_tower)
        text = llava.model.language_model
        self.feature_layers = feature_layer_indices(llava)
        strategy = llava.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UserError(f"vision_feature_select_strategy {strategy!r} is not supported (use 'default' or 'full')")

        # Prompts follow the dtype/device of the embeddings they sit beside (never quantized).
        vision_ref = vision.embeddings.patch_embedding.weight
        text_ref = text.embed_tokens.weight
        num_vision_layers = max(self.feature_layers)
        if config.official_vision_features:
            num_vision_layers = _official_feature_layer(llava, self.feature_layers) + 1  # its raw prompts are features
        register_prompts(self, "vision_prompts", torch.empty(
            num_vision_layers, config.num_vision_prompts, llava.config.vision_config.hidden_size,
            dtype=vision_ref.dtype, device=vision_ref.device,
        ))
        register_prompts(self, "text_prompts", torch.empty(
            llava.config.text_config.num_hidden_layers, config.num_text_prompts, llava.config.text_config.hidden_size,
            dtype=text_ref.dtype, device=text_ref.device,
        ))
        xavier_uniform_per_layer(self.vision_prompts)
        xavier_uniform_per_layer(self.text_prompts)
        self._set_trainable()

    # ----------------------------------------------------------------------------------------- setup
    def _set_trainable(self) -> None:
        """The one place that decides what M²PT trains."""
        config = self.m2pt_config
        self.llava.requires_grad_(False)
        self.projector.requires_grad_(config.tune_projector)
        if config.tune_lm_head:
            lm_head = self.llava.lm_head.weight
            embed = self.llava.model.language_model.embed_tokens.weight
            if lm_head is embed or (lm_head.device.type != "meta" and lm_head.data_ptr() == embed.data_ptr()):
                raise UserError(
                    "tune_lm_head=True on a model whose lm_head is tied to the input embeddings would also "
                    "train the embeddings; untie them first (config.tie_word_embeddings=False) or keep "
                    "tune_lm_head=False"
                )
            self.llava.lm_head.requires_grad_(True)

    family = "llava"  # the prompt file's metadata names it

    @property
    def projector(self) -> nn.Module:
        return self.llava.model.multi_modal_projector

    @property
    def lm_head(self) -> nn.Module:
        return self.llava.lm_head

    @property
    def image_size(self) -> int:
        return self.llava.config.vision_config.image_size

    @property
    def image_token_id(self) -> int:
        return self.llava.config.image_token_id

    @property
    def image_seq_length(self) -> int:
        """How many image tokens one image expands to in input_ids."""
        # the tower's positions: CLS + patches for CLIP, patches alone for SigLIP; "default" drops the first
        tokens = clip_parts(self.llava.model.vision_tower).embeddings.num_positions
        if self.m2pt_config.official_vision_features:
            tokens += self.num_vision_prompts  # the raw prompt rows ride along (row 0 dropped by "default")
        return tokens - (1 if self.llava.config.vision_feature_select_strategy == "default" else 0)

    @property
    def frozen_model(self) -> nn.Module:
        return self.llava

    @property
    def language_model(self):
        """The transformers decoder (LlamaModel) the text prompts live in."""
        return self.llava.model.language_model

    # --------------------------------------------------------------------------------------- vision
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B_img, 3, H, W) -> projected features (B_img, image_seq_length, d_text)."""
        self._check_pixels(pixel_values)
        # Layers after the deepest selected one cannot affect the features: they are never run.
        states = vision_states(self, clip_parts(self.llava.model.vision_tower), pixel_values,
                               self.vision_prompts, max(self.feature_layers))
        start = 1 if self.llava.config.vision_feature_select_strategy == "default" else 0  # drop CLS
        if self.m2pt_config.official_vision_features:
            # the released code: layer k's input with its prompts written in, then row 0 dropped ("patch")
            k = self.feature_layers[0]
            raw = self.vision_prompts[k].unsqueeze(0).expand(states[k].shape[0], -1, -1).to(states[k].dtype)
            return self.projector(torch.cat([raw, states[k]], dim=1)[:, start:])
        selected = torch.cat([states[k][:, start:] for k in self.feature_layers], dim=-1)
        return self.projector(selected)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise UserError(
                f"pixel_values must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}) for this "
                f"vision tower, got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise UserError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")

    # ----------------------------------------------------------------------------------------- text
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        return_logits: bool | None = None,
    ) -> M2PTOutput:
        """The same inputs as transformers' LLaVA.

        input_ids: (B, T), with `image_token_id` repeated `image_seq_length` times per image;
        attention_mask: (B, T_past + T), 1 for tokens, 0 for padding (prompt positions are added here);
        labels: (B, T), -100 where no loss is taken; position_ids: (B, T) text positions (default
        0.. for a fresh sequence), shifted by n_t internally; cache: `out.cache` of an earlier call
        (it holds the prompt rows). return_logits: default True for the reference backend; the
        fused backend computes logits only when asked or when no labels are given.
        """
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        embeds = self.embed_inputs(input_ids, pixel_values)
        return text_forward(self, embeds, attention_mask, labels, position_ids, cache, use_cache, return_logits)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """input_ids (B, T) -> input embeddings (B, T, d_text), image tokens replaced by the features of
        pixel_values (computed with the vision prompts, by this model's backend)."""
        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, d)
        is_image = input_ids == self.image_token_id
        num_image_tokens = int(is_image.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        expected = num_images * self.image_seq_length
        if num_image_tokens != expected:
            raise UserError(
                f"input_ids hold {num_image_tokens} image tokens (id {self.image_token_id}) but "
                f"{num_images} image(s) need {expected} ({self.image_seq_length} each): expand each <image> "
                f"placeholder to {self.image_seq_length} image tokens, one per image in pixel_values"
            )
        if num_images:
            features = self.image_features(pixel_values)  # (B_img, S, d)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------------------------- generation
    def generate(self, input_ids, pixel_values=None, max_new_tokens=32, **kwargs) -> torch.Tensor:
        """transformers' generate, the prompt K/V as the prefix of its cache; see m2pt_fast.method.generation."""
        return generate(self, input_ids, pixel_values, max_new_tokens, **kwargs)


def apply_m2pt(
    model: LlavaForConditionalGeneration | Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration,
    num_vision_prompts: int = 10,
    num_text_prompts: int = 10,
    *,
    tune_projector: bool = True,
    tune_lm_head: bool = False,
    backend: str = "reference",
    official_vision_features: bool = False,
    method: str = "m2pt",
) -> M2PTLlava | M2PTQwenVL:
    """Wrap a transformers LLaVA, Qwen2.5-VL or Qwen3-VL for M²PT: deep prompts in every vision and
    decoder layer, a trainable interaction layer (LLaVA's projector, the Qwen models' mergers), everything
    else frozen.
    The model's weights are shared with the returned model.

    official_vision_features: select vision features as the released M²PT code does (for prompts
    converted from its checkpoints; docs/method.md), not as the method describes (LLaVA only). method:
    the paper's method this model is trained as (methods.apply_method gives it)."""
    config = M2PTConfig(num_vision_prompts, num_text_prompts, tune_projector, tune_lm_head, official_vision_features,
                        method)
    if isinstance(model, (Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)):
        return M2PTQwenVL(model, config, backend=backend)
    return M2PTLlava(model, config, backend=backend)
