"""The fused path's lean norms and activations (m2pt_fast/lean_activations.py) against transformers' own modules:
the same outputs and gradients, and less saved for backward."""
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.activations import QuickGELUActivation
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from m2pt_fast import apply_m2pt, build_llava
from m2pt_fast.method import lean_activations

DTYPES = [torch.float32, torch.bfloat16]


def _saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (inputs excluded)."""
    inputs_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved.values())


def _run(module, x):
    x = x.detach().requires_grad_(True)
    out = module(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _pair(module, x):
    module.zero_grad()
    plain = _run(module, x)
    lean_activations.set_lean(module, True)
    module.zero_grad()
    fast = _run(module, x)
    lean_activations.set_lean(module, False)
    return plain, fast


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_computes_the_same_and_saves_no_fp32_copy(dtype):
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 7, 64).to(dtype)
    (out, gx, gw), (lean_out, lean_gx, lean_gw) = _pair(norm, x)
    assert torch.equal(lean_out, out)  # the forward is the same ops
    # the backward is a closed form: rounding differs (fp32 inside, one rounding to the dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ((lean_gx.float() - gx.float()).norm() / gx.float().norm()) < tol
    assert ((lean_gw["weight"].float() - gw["weight"].float()).norm() / gw["weight"].float().norm()) < tol
    rows = 3 * 7
    plain = _saved_bytes(norm, x.requires_grad_(True))
    lean_activations.set_lean(norm, True)
    lean_saved = _saved_bytes(norm, x)
    lean_activations.set_lean(norm, False)
    assert lean_saved == rows * 4 + 64 * x.element_size()  # 1/rms per row, and the weight (x is the input)
    assert plain >= rows * 64 * 4  # transformers' module keeps an fp32 copy of the input


def test_rms_norm_gradient_is_as_close_to_float64_as_autograd_s():
    torch.manual_seed(3)
    x = torch.randn(6, 48)
    w = torch.randn(48)
    g = torch.randn(6, 48)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).backward(g.double())
    errors = {}
    for name, fn in (("lean", lambda a, b: lean_activations.rms_norm(a, b, 1e-6)),
                     ("autograd", lambda a, b: b * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)))):
        a, b = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fn(a, b).backward(g)
        errors[name] = max(((a.grad.double() - x64.grad).norm() / x64.grad.norm()).item(),
                           ((b.grad.double() - w64.grad).norm() / w64.grad.norm()).item())
    assert errors["lean"] < 1e-6
    assert errors["lean"] <= 2 * errors["autograd"] + 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_mlp_is_bit_for_bit_and_saves_one_tensor_less(dtype):
    config = LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")
    mlp = LlamaMLP(config).to(dtype)
    mlp.gate_proj.weight.requires_grad_(False)  # frozen, as in M²PT: only dX flows
    x = torch.randn(2, 5, 32).to(dtype)
    (out, gx, _), (lean_out, lean_gx, _) = _pair(mlp, x)
    assert torch.equal(lean_out, out) and torch.equal(lean_gx, gx)
    mlp.requires_grad_(False)
    intermediate = 2 * 5 * 48 * x.element_size()
    plain = _saved_bytes(mlp, x.requires_grad_(True))
    lean_activations.set_lean(mlp, True)
    lean_saved = _saved_bytes(mlp, x)
    lean_activations.set_lean(mlp, False)
    assert plain - lean_saved == intermediate  # silu(gate) is no longer kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_gelu_mlp_is_bit_for_bit_and_keeps_no_sigmoid(dtype):
    mlp = CLIPMLP(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4)).to(dtype)
    assert isinstance(mlp.activation_fn, QuickGELUActivation)
    x = torch.randn(2, 5, 32).to(dtype)
    (out, gx, grads), (lean_out, lean_gx, lean_grads) = _pair(mlp, x)
    assert torch.equal(lean_out, out) and torch.equal(lean_gx, gx)
    assert all(torch.equal(lean_grads[n], grads[n]) for n in grads)
    mlp.requires_grad_(False)
    plain = _saved_bytes(mlp, x.requires_grad_(True))
    lean_activations.set_lean(mlp, True)
    lean_saved = _saved_bytes(mlp, x)
    lean_activations.set_lean(mlp, False)
    assert plain - lean_saved == 2 * 5 * 48 * x.element_size()


def test_the_backend_installs_them_on_the_fused_path_only():
    model = apply_m2pt(build_llava("tiny", seed=0), 2, 2, backend="reference")
    norms = [m for m in model.llava.modules() if isinstance(m, LlamaRMSNorm)]
    mlps = [m for m in model.llava.modules() if isinstance(m, (LlamaMLP, CLIPMLP))]
    assert norms and mlps
    assert not any("forward" in vars(m) for m in norms + mlps)
    model.backend = "fused"
    # the tiny CLIP uses quick GELU, the decoder SwiGLU: every norm and MLP is lean
    assert all("forward" in vars(m) for m in norms + mlps)
    model.backend = "reference"
    assert not any("forward" in vars(m) for m in norms + mlps)


def test_modules_they_do_not_reproduce_are_left_alone():
    config = LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="gelu")
    mlp = LlamaMLP(config)
    assert lean_activations.set_lean(mlp, True) == 0 and "forward" not in vars(mlp)
