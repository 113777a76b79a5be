"""What the end-to-end benchmarks run: ours and the baseline a user writes today (docs/benchmarks.md).

- ours: build_llava → m2pt_fast.models.quantize.quantize_model (our NF4) → apply_m2pt(backend="fused");
- baseline: the same random LLaVA with bitsandbytes Linear4bit layers (nf4, double quant, compute in
  the model dtype) where transformers would put them → apply_m2pt(backend="reference") on SDPA,
  with transformers' gradient checkpointing.
Both train only the prompts and the projector with AdamW.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch import nn

from m2pt_fast import apply_m2pt, build_llava

# provider -> {"steps": {"ckpt" | "no-ckpt": figures}, "max_microbatch_24gib": n}, filled by the benches
HEADLINE_RESULTS: dict[str, dict] = {}
# provider -> {"ckpt" | "no-ckpt": counted peak and breakdown, "max_microbatch_24gib": n}: test_bench_memory
MEMORY_RESULTS: dict[str, dict] = {}


@dataclass(frozen=True)
class StepShape:
    model: str  # a named shape of m2pt_fast.build_llava
    batch: int
    text_tokens: int  # text tokens besides the image tokens
    answer_tokens: int  # tokens with labels (the tail of the text)
    num_prompts: int  # n_v = n_t
    dtype: torch.dtype
    quant: str  # "nf4" or "none"

    def __str__(self):
        return f"{self.model}-b{self.batch}-{self.quant}"


# The headline: LLaVA-1.5-7B shapes, NF4, bf16, n = 10, micro-batch 8, 576 image + 128 text tokens.
HEADLINE = StepShape("llava-1.5-7b", 8, 128, 32, 10, torch.bfloat16, "nf4")
# On a CPU: proves the harness and compares the two paths' work, never the product's speed.
CPU_SHAPE = StepShape("tiny-gqa", 2, 24, 8, 4, torch.float32, "nf4")


def default_shape() -> StepShape:
    return HEADLINE if torch.cuda.is_available() else CPU_SHAPE


def make_batch(model, shape: StepShape, batch: int | None = None, seed: int = 0):
    """input_ids = [BOS, image tokens, text]; labels on the last answer_tokens; no padding."""
    batch = batch or shape.batch
    device = model.vision_prompts.device
    g = torch.Generator().manual_seed(seed)
    vocab = model.llava.config.text_config.vocab_size
    image = torch.full((batch, model.image_seq_length), model.image_token_id)
    text = torch.randint(2, min(vocab, model.image_token_id), (batch, shape.text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -shape.answer_tokens:] = ids[:, -shape.answer_tokens:]
    pixels = torch.randn(batch, 3, model.image_size, model.image_size, generator=g)
    return ids.to(device), pixels.to(device, shape.dtype), torch.ones_like(ids).to(device), labels.to(device)


def _bnb_params_on_meta(out_features: int, in_features: int, dtype: torch.dtype):
    """A bitsandbytes Params4bit on meta with the storage a quantized (nf4, double quant, blocksize
    64) weight has on a GPU: packed bytes (N·K/2, 1) uint8, 8-bit absmax per block, and the nested
    statistics (fp32 absmax per 256 blocks, the 256-entry code, the offset), plus the 16-entry NF4
    code. Nothing is quantized: meta has no values to quantize."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n = out_features * in_features
    blocks = -(-n // 64)
    meta = dict(device="meta")
    nested = QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32, **meta),
                        code=torch.empty(256, dtype=torch.float32, **meta), blocksize=256, dtype=torch.float32)
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, **meta),
                       shape=torch.Size((out_features, in_features)),
                       code=torch.empty(16, dtype=torch.float32, **meta), blocksize=64, quant_type="nf4", dtype=dtype,
                       offset=torch.empty((), dtype=torch.float32, **meta), state2=nested)
    return bnb.nn.Params4bit(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, **meta), requires_grad=False,
                             quant_state=state, blocksize=64, compress_statistics=True, quant_type="nf4",
                             bnb_quantized=True)


def _bnb_quantize(llava, dtype: torch.dtype) -> None:
    """Swap the vision tower's and decoder's nn.Linear for bitsandbytes Linear4bit (nf4, double quant)."""
    import bitsandbytes as bnb

    device = llava.lm_head.weight.device
    for part in (llava.model.vision_tower, llava.model.language_model):
        for name, module in list(part.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                          device="meta")
            if device.type == "meta":
                quantized.weight = _bnb_params_on_meta(module.out_features, module.in_features, dtype)
            else:
                quantized.weight = bnb.nn.Params4bit(module.weight.data.to("cpu" if device.type == "cpu" else device),
                                                     requires_grad=False, quant_type="nf4", compress_statistics=True)
            if module.bias is not None:
                quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, child, quantized.to(device))


def build(provider: str, shape: StepShape, device: str, checkpointing: bool = True):
    """A trainable M²PT model and its optimizer, for provider "ours" or "baseline"; checkpointing
    recomputes every layer in backward (ours: its fused layers; baseline: transformers' own)."""
    llava = build_llava(shape.model, device=device, dtype=shape.dtype)
    if provider == "ours":
        if shape.quant == "nf4":
            from m2pt_fast.models.quantize import quantize_model

            quantize_model(llava)
        model = apply_m2pt(llava, shape.num_prompts, shape.num_prompts, backend="fused")
    elif provider == "baseline":
        if shape.quant == "nf4":
            _bnb_quantize(llava, shape.dtype)
        model = apply_m2pt(llava, shape.num_prompts, shape.num_prompts, backend="reference")
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=7e-4)
    return model, optimizer


def count_memory(shape: StepShape, provider: str, checkpointing: bool, micro_batch: int | None = None, *,
                 warm: bool = False, timeline: bool = False):
    """The peak memory of `provider`'s training steps at `shape`, counted on meta (m2pt_fast.planning.memory):
    two steps of a fresh model, as the GPU bench measures them, or one after warm_optimizer."""
    from m2pt_fast.planning import memory

    model, optimizer = build(provider, shape, "meta", checkpointing=checkpointing)
    if warm:
        memory.warm_optimizer(optimizer)

    def batch():
        ids, pixels, mask, labels = make_batch(model, shape, batch=micro_batch)
        return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)

    return memory.count_steps(model, optimizer, batch, steps=1 if warm else 2, timeline=timeline)


def headline_figures(results: dict) -> dict:
    """Each side at its faster checkpointing choice (docs/benchmarks.md: 'as each side runs faster')."""
    steps = results.get("steps", {})
    if not steps:
        return {}
    choice = max(steps, key=lambda variant: steps[variant]["samples_per_s"])
    return {**steps[choice], "gradient_checkpointing": choice == "ckpt",
            "max_microbatch_24gib": results.get("max_microbatch_24gib")}


def train_step(model, optimizer, batch) -> float:
    ids, pixels, mask, labels = batch
    loss = model(ids, pixels, mask, labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def release_memory() -> None:
    """Free what the last bench left behind: Python garbage, the CUDA allocator's cached blocks and
    its peak counter, so the next bench starts from the same allocator state."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


MICROBATCH_CANDIDATES = (8, 12, 16, 24, 32, 48, 64, 96, 128)


def max_microbatch(provider: str, shape: StepShape, device: str = "cuda", limit_bytes: int = 24 * 2**30,
                   candidates=MICROBATCH_CANDIDATES) -> int:
    """The largest of `candidates` whose training step (checkpointing on) runs while the CUDA caching
    allocator may hold at most `limit_bytes`; 0 if none does. The limit is lifted and the cache
    emptied on the way out, whatever happened, so later benches see the whole GPU again."""
    total = torch.cuda.get_device_properties(device).total_memory
    release_memory()
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
    largest = 0
    try:
        model, optimizer = build(provider, shape, device)
        for batch_size in candidates:
            try:
                train_step(model, optimizer, make_batch(model, shape, batch=batch_size))
                torch.cuda.synchronize(device)
            except torch.OutOfMemoryError:
                break
            largest = batch_size
            release_memory()
        del model, optimizer
    finally:
        release_memory()  # after the handler: a live OOM exception still holds the failed step's tensors
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return largest


def useful_flops_per_sample(model, shape: StepShape) -> float:
    """Forward + input-gradient backward of every matmul and attention (docs/benchmarks.md).

    A frozen linear layer's backward is one matmul (dX), as much as its forward: 2 × forward.
    Attention has no weights: its inputs Q, K, V are all activations, so its backward is four
    matmuls (dV, dP, dQ, dK) for the forward's two: 3 × forward. The projector is trained: its
    weight gradient is useful work too, 3 × forward. Causal attention counts the visible half of
    the keys; recomputation is not counted; lm_head at answer tokens only. The prompts' own K/V
    rows (n per layer, computed once per step) are left out: about 0.03% of a headline step.
    """
    config = model.llava.config
    v, t = config.vision_config, config.text_config
    n = shape.num_prompts
    vision_tokens = (v.image_size // v.patch_size) ** 2 + 1
    vision_layers = max(model.feature_layers)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q_width, kv_width = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    text_tokens = 1 + model.image_seq_length + shape.text_tokens

    vision_matmul = vision_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    vision = 2 * vision_matmul * vision_tokens
    vision_attention = vision_layers * 4 * vision_tokens * (vision_tokens + n) * v.hidden_size  # QKᵀ and PV, full
    text_matmul = t.num_hidden_layers * (t.hidden_size * (2 * q_width + 2 * kv_width)
                                         + 3 * t.hidden_size * t.intermediate_size)
    text = 2 * text_matmul * text_tokens
    text_attention = t.num_hidden_layers * 4 * text_tokens * (text_tokens / 2 + n) * q_width  # causal: half the keys
    projector = 2 * sum(p.numel() for p in model.projector.parameters() if p.dim() == 2) * model.image_seq_length
    lm_head = 2 * t.hidden_size * t.vocab_size * shape.answer_tokens
    return 2.0 * (vision + text + lm_head) + 3.0 * (vision_attention + text_attention + projector)


def dense_bf16_rate(size: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s on this GPU (the MFU denominator)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * size ** 3 / times[len(times) // 2]
