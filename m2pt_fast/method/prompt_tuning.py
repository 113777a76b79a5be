"""Deep prompt tuning without LLaVA: the same machinery on a plain vision or language model.

- `DeepVisionPrompts`: VPT-deep on a transformers `CLIPVisionModel` or `SiglipVisionModel` — n
  trainable prompt rows in every encoder layer, the backbone frozen.
- `DeepTextPrompts`: deep text prompts (prefix tuning with prompt rows) on a decoder-only causal LM
  (`LlamaForCausalLM`, and the families of docs/models.md: Qwen2, Qwen3, Mistral, Phi-3, Gemma) —
  n trainable rows before every decoder layer's input, the backbone frozen; trains and generates.

Both have M²PT's two backends: "reference" puts the prompt rows in the sequence, "fused" hands each
layer's prompt K/V to `m2pt_kernels.prefix_attention` as a batch-shared prefix.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from m2pt_fast.errors import UserError
from m2pt_fast.method.attention import route_attention
from m2pt_fast.method.generation import generate
from m2pt_fast.method.model import clip_parts, vision_states
from m2pt_fast.method.prompted import M2PTConfig, M2PTOutput, PromptTuned, text_forward, xavier_uniform_per_layer


def _prompt_parameter(layers: int, n: int, width: int, like: torch.Tensor) -> nn.Parameter:
    M2PTConfig(num_vision_prompts=n, num_text_prompts=n)  # validates n
    prompts = nn.Parameter(torch.empty(layers, n, width, dtype=like.dtype, device=like.device))
    xavier_uniform_per_layer(prompts)
    return prompts


class DeepVisionPrompts(PromptTuned, nn.Module):
    """VPT-deep: prompts (L, n, d) in every layer of a frozen CLIPVisionModel or SiglipVisionModel."""

    def __init__(self, vision_model: CLIPVisionModel | SiglipVisionModel, num_prompts: int = 10, *,
                 backend: str = "fused"):
        super().__init__()
        if not isinstance(vision_model, (CLIPVisionModel, SiglipVisionModel)):
            raise TypeError("DeepVisionPrompts takes a transformers CLIPVisionModel or SiglipVisionModel, got "
                            f"{type(vision_model).__name__}")
        self.vision_model = vision_model.requires_grad_(False)
        self.backend = backend
        route_attention(vision_model)
        config = vision_model.config
        self.prompts = _prompt_parameter(config.num_hidden_layers, num_prompts, config.hidden_size,
                                         clip_parts(vision_model).embeddings.patch_embedding.weight)

    @property
    def frozen_model(self) -> nn.Module:
        return self.vision_model

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        """pixel_values (B, 3, H, W) -> what the plain model returns, without prompt rows: CLIP's
        last_hidden_state (B, 1 + patches, d) and pooler_output (B, d) (post-layernormed CLS); SigLIP's
        post-layernormed last_hidden_state (B, patches, d) and its attention-pooling head's output (None
        without a head); every layer's state when asked."""
        tower = clip_parts(self.vision_model)
        states = vision_states(self, tower, pixel_values, self.prompts, len(tower.encoder.layers))
        last = states[-1]
        if isinstance(self.vision_model, SiglipVisionModel):
            last = tower.post_layernorm(last)
            pooled = tower.head(last) if tower.use_head else None
        else:
            pooled = tower.post_layernorm(last[:, 0])
        return BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


_DECODER_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")


class DeepTextPrompts(PromptTuned, nn.Module):
    """Deep text prompts (L, n, d) before every decoder layer of a frozen decoder-only causal LM."""

    def __init__(self, causal_lm: PreTrainedModel, num_prompts: int = 10, *, backend: str = "fused"):
        super().__init__()
        decoder = getattr(causal_lm, "model", None)
        if not (isinstance(causal_lm, PreTrainedModel) and hasattr(causal_lm, "lm_head")
                and all(hasattr(decoder, part) for part in _DECODER_PARTS)):
            raise TypeError("DeepTextPrompts takes a transformers decoder-only causal LM laid out as "
                            "LlamaForCausalLM is (.model with embed_tokens, layers, rotary_emb, norm; .lm_head), "
                            f"got {type(causal_lm).__name__}")
        self.causal_lm = causal_lm.requires_grad_(False)
        self.backend = backend
        route_attention(causal_lm)
        config = causal_lm.config
        self.text_prompts = _prompt_parameter(config.num_hidden_layers, num_prompts, config.hidden_size,
                                              causal_lm.model.embed_tokens.weight)

    @property
    def frozen_model(self) -> nn.Module:
        return self.causal_lm

    @property
    def language_model(self):
        return self.causal_lm.model

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, *, position_ids=None, cache=None,
                use_cache=False, return_logits=None) -> M2PTOutput:
        """input_ids (B, T); attention_mask (B, T_past + T); labels (B, T) -> loss, logits (B, T, V)."""
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        embeds = self.language_model.embed_tokens(input_ids)
        return text_forward(self, embeds, attention_mask, labels, position_ids, cache, use_cache, return_logits)

    @property
    def num_text_prompts(self) -> int:
        return self.text_prompts.shape[1]

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def generate(self, input_ids, max_new_tokens=32, **kwargs) -> torch.Tensor:
        """transformers' generate, the prompt K/V as the prefix of its cache; see m2pt_fast.method.generation."""
        return generate(self, input_ids, None, max_new_tokens, **kwargs)
