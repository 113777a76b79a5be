"""The fused path's lean activations: the frozen model's norms and MLP activations, saving less.

Counted at the headline step (docs/memory.md), most of a step's activation memory is not attention
but what autograd saves around the norms and MLP activations of transformers' own modules:
- LLaMA/Qwen2 RMSNorm upcasts its input to fp32 and saves that copy (twice the input's bytes) for
  `pow` and `mul`;
- the SwiGLU MLP saves the gate projection for `silu`, and `silu(gate)` and the up projection for
  the product: three intermediate-sized tensors;
- CLIP's quick GELU, x·sigmoid(1.702x), saves x and the sigmoid.
On the fused backend these modules run through autograd functions that compute the same forward,
op for op (the same output, bit for bit), and save only their inputs (and RMSNorm's per-row
1/rms), recomputing the rest in backward: RMSNorm saves the input in its own dtype instead of an fp32
copy, SwiGLU keeps gate and up but not silu(gate), quick GELU keeps x but not the sigmoid. The SwiGLU
and quick-GELU backwards are the ops autograd runs for the originals (the same gradients, bit for
bit); RMSNorm's is the closed form r·(g − x̂·mean(g·x̂)), with g = dy·w and x̂ = x·r, in fp32.

`set_lean(model, True)` installs them on every module of a known class whose computation they
reproduce (an instance `forward`; `False` removes it): M²PT's `backend` setter does that, so the
reference backend stays transformers' plain modules.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up (silu(gate) is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


class _QuickGelu(torch.autograd.Function):
    """x * sigmoid(1.702 x), saving x (the sigmoid is recomputed in backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * s + torch.ops.aten.sigmoid_backward(grad * x, s) * 1.702


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm, weight · (x / rms(x)) computed in fp32 and cast back, saving x and 1/rms."""
    return _RMSNorm.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return _QuickGelu.apply(x)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _quick_gelu_mlp_forward(self, hidden_states):
    return self.fc2(quick_gelu(self.fc1(hidden_states)))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation" and
                                        type(act).__module__.startswith("transformers."))


@functools.cache
def _known() -> dict:
    """{module class: (does this instance compute what the lean forward does?, the lean forward)}."""
    def always(module):
        return True

    def silu(module):
        return _is_silu(module.act_fn)

    def quick_gelu_activation(module):
        return type(module.activation_fn) is QuickGELUActivation

    return {LlamaRMSNorm: (always, _rms_norm_forward), Qwen2RMSNorm: (always, _rms_norm_forward),
            LlamaMLP: (silu, _swiglu_mlp_forward), Qwen2MLP: (silu, _swiglu_mlp_forward),
            CLIPMLP: (quick_gelu_activation, _quick_gelu_mlp_forward)}


def _lean_forward(module: nn.Module):
    """The lean forward reproducing `module`'s own, or None for a module it does not know."""
    fits, forward = _known().get(type(module), (None, None))
    return forward if fits is not None and fits(module) else None


def set_lean(model: nn.Module, enabled: bool) -> int:
    """Install (or remove) the lean forwards on every module of `model` they reproduce; returns how many."""
    count = 0
    for module in model.modules():
        forward = _lean_forward(module)
        if forward is None:
            continue
        if enabled:
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)
        count += 1
    return count
