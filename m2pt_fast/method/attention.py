"""Prompt K/V inside transformers' own attention: the "m2pt_prefix" attention implementation.

transformers routes the attention of CLIP, LLaMA and most other models through a registry
(`ALL_ATTENTION_FUNCTIONS`, keyed by `config._attn_implementation`) and hands that function the
keyword arguments of the model's forward. `route_attention(model)` points every config under a model
at "m2pt_prefix"; the function registered under that name then

- with no `m2pt` keyword (the reference backend, plain use of the model), runs the implementation
  the model had before (sdpa, eager, flash-attn...), masks included;
- with `m2pt=PrefixContext(...)`, calls `m2pt_kernels.prefix_attention` with the prefix K/V of the
  calling attention module (causal where the module is, `kv_lens` for right padding);
- with `m2pt=CAPTURE`, hands the layer's own keys and values back to `prefix_kv` without attending:
  running a layer on the prompt rows yields their K/V exactly as that layer computes K/V (its norm,
  biases, RoPE, q/k norms), and nothing after attention runs. The prompt rows' queries are computed
  and unused: n × d × d_q per layer, 11 GFLOP of a 220 TFLOP LLaVA-1.5-7B step (0.005%; README).

Some layers do not pass the forward's keyword arguments on to their attention (SigLIP's before
transformers 5.25; InternVL's vision layers, whose forward takes none). `run_layer` therefore also
sets the context in a context variable, read where the keyword is missing, and checkpoints the
layer itself so that the recompute runs inside the context too. A forward that leaves a prefix
unused raises (`PrefixContext.check_used`) rather than silently computing without prompts.

So the model's own layers, norms, RoPE, checkpointing and NF4 modules run unchanged in the fused
backend; only attention sees the prefix.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from m2pt_fast.errors import UserError
from m2pt_kernels import prefix_attention

NAME = "m2pt_prefix"
_INNER = "_m2pt_inner_attn_implementation"  # the config attribute holding the implementation we wrap


@dataclass
class PrefixContext:
    """What a fused forward passes down as `m2pt=`: the prefix of each attention module.

    prefix: {attention module: (K, V)}, each (Hkv, P, D) shared by the batch; modules absent attend
    without a prefix. kv_lens: (B,) int32 sequence lengths of a right-padded batch, or None.
    """

    prefix: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kv_lens: torch.Tensor | None = None
    used: set = field(default_factory=set)

    def check_used(self) -> None:
        missed = [type(m).__name__ for m in self.prefix if m not in self.used]
        if missed:
            raise RuntimeError(f"{len(missed)} attention module(s) ({missed[0]}, ...) never received their prompt "
                               "K/V: their layers do not route attention through transformers' attention interface")


CAPTURE = object()  # `m2pt=CAPTURE`: return the layer's K/V to prefix_kv instead of attending
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("m2pt_prefix_context", default=None)


class _Captured(Exception):
    def __init__(self, module: nn.Module, key: torch.Tensor, value: torch.Tensor):
        super().__init__("prompt K/V captured")
        self.module, self.key, self.value = module, key, value


def _inner_attention(module: nn.Module):
    name = getattr(module.config, _INNER, "sdpa")
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    # "eager" is not registered: each modeling file defines its own eager_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UserError(f"attention implementation {name!r} of {type(module).__name__} is not available")
    return eager


def _m2pt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, m2pt=None, **kwargs):
    """query (B, Hq, N, D), key/value (B, Hkv, N, D) -> ((B, N, Hq, D), None), as transformers expects."""
    if m2pt is None:
        m2pt = _ACTIVE.get()
    if m2pt is None:
        return _inner_attention(module)(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, **kwargs)
    if m2pt is CAPTURE:
        raise _Captured(module, key, value)
    if dropout:
        raise UserError("the fused backend runs attention without dropout (the frozen model's is 0 in M²PT)")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    prefix_k, prefix_v = m2pt.prefix.get(module, (None, None))
    _check_computable(module, key.shape[-2] + (0 if prefix_k is None else prefix_k.shape[-2]), kwargs)
    if prefix_k is not None:
        m2pt.used.add(module)
        prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal,
                           softmax_scale=scaling, kv_lens=m2pt.kv_lens)
    return out.transpose(1, 2), None


def _check_computable(module, keys: int, kwargs: dict) -> None:
    """Refuse what prefix_attention does not compute rather than compute something else: attention
    sinks, and a sliding window shorter than the keys (prompt rows included) it would mask."""
    name = type(module).__name__
    if kwargs.get("cu_seq_lens_q") is not None:
        raise UserError(f"{name} attends within packed segments in one call (flash attention's cu_seq_lens), "
                        "which prefix_attention does not compute: load the model with attn_implementation='sdpa'")
    for sink in ("s_aux", "sinks"):
        if kwargs.get(sink) is not None:
            raise UserError(f"{name} adds attention sinks ({sink}), which the fused backend does not compute; "
                            "use backend='reference'")
    window = kwargs.get("sliding_window")
    if window is not None and keys > window:
        raise UserError(f"{name} attends within a sliding window of {window} positions and this forward has "
                        f"{keys} keys (prompt rows included): the fused backend attends to all of them. Use "
                        "backend='reference', or sequences of at most the window")


def _m2pt_mask(*args, config=None, **kwargs):
    # The reference backend builds masks through the config's implementation name: give it the wrapped one's.
    inner = getattr(config, _INNER, "sdpa")
    return ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, config=config, **kwargs)


AttentionInterface.register(NAME, _m2pt_attention)
AttentionMaskInterface.register(NAME, _m2pt_mask)


def route_attention(model: nn.Module) -> None:
    """Point the config of every module under `model` at "m2pt_prefix" (idempotent). Calls without
    `m2pt=` keep the implementation the config named before."""
    for module in model.modules():
        config = getattr(module, "config", None)
        # Attention modules hold leaf configs; setting a composite one (LlavaConfig) would overwrite its
        # sub-configs' names before they were recorded.
        if config is None or not hasattr(config, "_attn_implementation") or getattr(config, "sub_configs", None):
            continue
        capped = [name for name in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(config, name, None)]
        if capped:
            raise UserError(f"{type(config).__name__} caps logits ({', '.join(capped)}, as Gemma 2 does), which "
                            "m2pt_fast's backends do not compute: this model is not supported")
        current = config._attn_implementation or "eager"  # None: get_interface's default, the eager path
        if current != NAME:
            if current not in ALL_MASK_ATTENTION_FUNCTIONS:
                raise UserError(f"{type(module).__name__} uses attention {current!r}, which m2pt_fast cannot wrap; "
                                "load the model with attn_implementation='sdpa' or 'eager'")
            setattr(config, _INNER, current)
            config._attn_implementation = NAME


@contextlib.contextmanager
def _no_checkpointing(layer: nn.Module):
    # A capture stops inside the layer: a checkpointed capture could never be replayed in backward.
    saved = getattr(layer, "gradient_checkpointing", None)
    if saved:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if saved:
            layer.gradient_checkpointing = saved


@contextlib.contextmanager
def _active(context):
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _call(layer, hidden, args, kwargs, context):
    # The layer's own checkpointing stays off here, in the forward and in the recompute alike: a
    # second checkpoint inside ours would save other tensors in each.
    with _active(context), _no_checkpointing(layer):
        return layer(hidden, *args, m2pt=context, **kwargs)


def run_layer(layer: nn.Module, hidden: torch.Tensor, context: PrefixContext, *args, **kwargs) -> torch.Tensor:
    """layer(hidden, *args, **kwargs) with `context` reaching its attention by keyword or, where the
    attention drops keywords, by context variable; checkpointed like the layer's own flags say."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return checkpoint(_call, layer, hidden, args, kwargs, context, use_reentrant=False)
    return _call(layer, hidden, args, kwargs, context)


def prefix_kv(layer: nn.Module, rows: torch.Tensor, *args, packed: bool = False, **kwargs):
    """(attention module, (K, V)) of the prompt rows (n, d) as `layer` computes them, K and V each
    (Hkv, n, D): layer(rows[None], *args, **kwargs) runs up to its attention, which hands back its
    keys and values; its output projection, MLP and the rest never run. packed: the layer takes rows
    unbatched, (N, d) with cu_seqlens (Qwen2.5-VL's vision blocks): layer(rows, ...)."""
    with _no_checkpointing(layer), _active(CAPTURE):
        try:
            layer(rows if packed else rows[None], *args, m2pt=CAPTURE, **kwargs)
        except _Captured as captured:
            return captured.module, (captured.key[0], captured.value[0])
    raise RuntimeError(
        f"{type(layer).__name__} finished without calling its attention through transformers' attention "
        "interface with the keyword arguments it was given: this layer cannot carry prompt K/V"
    )
