"""M²PT on Qwen2.5-VL and Qwen3-VL against docs/method.md's definitions, on tiny float64 models: zero
prompts give the plain model exactly; with prompts, the reference equals a construction from the
definition made here with the model's own blocks (each attention segment run on its own, prompts
before it) and its own decoder forward (prompt rows overwritten by hooks, Qwen3-VL's deepstack by the
model itself); images packed together give the features each gives alone; the fused backend equals
the reference in loss and every prompt and interaction-layer gradient; generation equals a loop of
full forwards."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from m2pt_fast import UserError, apply_m2pt
from m2pt_fast.labels import IGNORE_INDEX
from m2pt_fast.method.qwen_vl import vision_features
from m2pt_fast.models import qwen2_5_vl, qwen3_vl

# the module (m2pt_kernels re-exports its function under the same name)
kernel_module = importlib.import_module("m2pt_kernels.prefix_attention")
IMAGE, START, END = 100, 102, 103
GRIDS = [(1, 8, 8), (1, 4, 12)]  # two images: 16 and 12 image tokens after the 2x2 merge


FAMILIES = {"qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, qwen2_5_vl.tiny_config),
            "qwen3_vl": (Qwen3VLForConditionalGeneration, qwen3_vl.tiny_config)}


def build(family, dtype=torch.float64):
    model_class, config = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config()).to(dtype).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def qwen(request):
    return build(request.param)


def batch(seed=1):
    """Two right-padded samples, one image each, with the processor's expanded image tokens."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=g, dtype=torch.float64)
    samples = [[1, 5, START] + [IMAGE] * (t * h * w // 4) + [END] + torch.randint(3, 90, (k,), generator=g).tolist()
               for (t, h, w), k in zip(GRIDS, (5, 8))]
    length = max(map(len, samples))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in samples])
    mask = (torch.arange(length)[None] < torch.tensor([[len(s)] for s in samples])).long()
    labels = ids.masked_fill((mask == 0) | (ids >= IMAGE), IGNORE_INDEX)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                mm_token_type_ids=(ids == IMAGE).long(), labels=labels)


@pytest.mark.parametrize("with_token_types", [True, False], ids=["mrope", "1d-positions"])
def test_zero_prompts_give_the_plain_model_exactly(qwen, with_token_types):
    inputs = batch()
    if not with_token_types:
        inputs.pop("mm_token_type_ids")
        if isinstance(qwen, Qwen3VLForConditionalGeneration):  # which refuses images without them
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                qwen(**inputs)
            with pytest.raises(UserError, match="mm_token_type_ids"):
                apply_m2pt(qwen, 0, 0)(**inputs)
            return
    plain = qwen(**inputs)
    ours = apply_m2pt(qwen, 0, 0)(**inputs)
    assert torch.equal(ours.loss, plain.loss)
    assert torch.equal(ours.logits, plain.logits)


def test_zero_prompts_without_images_give_the_plain_model_exactly(qwen):
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    plain = qwen(input_ids=ids, attention_mask=mask, labels=labels)
    ours = apply_m2pt(qwen, 0, 0)(ids, mask, labels=labels)
    assert torch.equal(ours.loss, plain.loss) and torch.equal(ours.logits, plain.logits)


def definition_vision(visual, pixel_values, grid_thw, prompts):
    """Docs/method.md's vision rule, built segment by segment: block i runs on each window (or whole
    image) on its own, with prompts[i] before it at the identity rotation; the segments, the rotary and
    the first block's input (Qwen3-VL's learned positions added) come from the plain tower's own forward,
    recorded by hooks."""
    seen = {}

    def record(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                           kwargs["position_embeddings"])
        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(visual.blocks)]
    try:
        visual(pixel_values, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    hidden = seen[0][0]
    n = prompts.shape[1]
    deepstack = []
    for i, block in enumerate(visual.blocks):
        _, cu, (cos, sin) = seen[i]
        outs = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            rows = torch.cat([prompts[i], hidden[start:end]])
            rotary = (torch.cat([torch.ones(n, cos.shape[-1], dtype=cos.dtype), cos[start:end]]),
                      torch.cat([torch.zeros(n, sin.shape[-1], dtype=sin.dtype), sin[start:end]]))
            alone = torch.tensor([0, rows.shape[0]], dtype=cu.dtype)
            outs.append(block(rows, cu_seqlens=alone, max_seqlen=None, position_embeddings=rotary)[n:])
        hidden = torch.cat(outs)
        if i in getattr(visual, "deepstack_visual_indexes", ()):  # Qwen3-VL: the states its deepstack reads
            deepstack.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(i)](hidden))
    if not hasattr(visual, "window_size"):  # Qwen3-VL: no windows, rows in image order
        return visual.merger(hidden), deepstack
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return visual.merger(hidden)[torch.argsort(window_index)], deepstack


def definition_loss_and_logits(qwen, text_prompts, vision_prompts, inputs):
    """The decoder rule through the model's own text forward: n_t prompt rows before the sequence at
    M-RoPE positions (j, j, j), every other position up by n_t, the rows overwritten before each later
    layer by forward pre-hooks, Qwen3-VL's deepstack features added by the model at the image tokens;
    the loss over the labelled positions, the prompt rows' logits dropped."""
    text = qwen.model.language_model
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    embeds = text.embed_tokens(ids)
    features, deepstack = definition_vision(qwen.model.visual, inputs["pixel_values"], inputs["image_grid_thw"],
                                            vision_prompts)
    embeds = embeds.masked_scatter((ids == IMAGE)[..., None].expand_as(embeds), features)
    positions, _ = qwen.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    n, batch_size = text_prompts.shape[1], ids.shape[0]
    prompt_positions = torch.arange(n).expand(3, batch_size, n)

    def overwrite(j):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([text_prompts[j].expand(batch_size, n, -1), hidden[:, n:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return hook

    handles = [layer.register_forward_pre_hook(overwrite(j), with_kwargs=True)
               for j, layer in enumerate(text.layers) if j > 0]
    extra = {}
    if deepstack:
        extra = {"visual_pos_masks": torch.cat([ids.new_zeros(batch_size, n, dtype=torch.bool), ids == IMAGE], 1),
                 "deepstack_visual_embeds": deepstack}
    try:
        hidden = text(inputs_embeds=torch.cat([text_prompts[0].expand(batch_size, n, -1), embeds], dim=1),
                      attention_mask=torch.cat([mask.new_ones(batch_size, n), mask], dim=1),
                      position_ids=torch.cat([prompt_positions, positions + n], dim=-1), **extra).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    logits = qwen.lm_head(hidden)
    # next-token loss over the whole sequence, the prompt rows unlabelled (n_t x -100 before the labels),
    # in fp32 as transformers' causal-LM loss upcasts the logits
    labels = torch.cat([labels.new_full((batch_size, n), IGNORE_INDEX), labels], dim=1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return loss, logits[:, n:]


def test_the_reference_equals_the_definition_in_loss_logits_and_gradients(qwen):
    torch.manual_seed(2)
    model = apply_m2pt(qwen, 3, 2)
    inputs = batch(seed=3)
    ours = model(**inputs)
    tuned = [model.vision_prompts, model.text_prompts, *interaction_parameters(model).values()]
    our_grads = torch.autograd.grad(ours.loss, tuned)
    loss, logits = definition_loss_and_logits(qwen, model.text_prompts, model.vision_prompts, inputs)
    their_grads = torch.autograd.grad(loss, tuned)
    # The logits are float64: packing the segments (ours) and running them one by one (here) add in
    # other orders, so they agree to float64 rounding. The loss and the gradients pass through the fp32
    # cross-entropy both sides compute (transformers' convention): they agree to fp32 rounding.
    torch.testing.assert_close(ours.logits, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.loss, loss, rtol=1e-6, atol=0)
    for mine, theirs in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-9)
    assert all(g.abs().sum() > 0 for g in our_grads)


def interaction_parameters(model):
    return {f"projector.{name}": p for name, p in model.projector.named_parameters()}


def test_prompts_change_the_features_but_not_their_count(qwen):
    inputs = batch()
    visual = qwen.model.visual
    plain, _ = vision_features(visual, inputs["pixel_values"], inputs["image_grid_thw"], torch.zeros(3, 0, 16))
    prompts = torch.randn(3, 4, 16, dtype=torch.float64)
    prompted, _ = vision_features(visual, inputs["pixel_values"], inputs["image_grid_thw"], prompts)
    assert prompted.shape == plain.shape == (sum(t * h * w // 4 for t, h, w in GRIDS), 32)
    # far above float64 rounding (1e-16): the prompts' own effect, small in a tiny random tower
    assert (prompted - plain).abs().max() > 1e-6 * plain.abs().max()


def test_images_packed_together_give_what_each_gives_alone(qwen):
    inputs = batch()
    visual, pixels, grid = qwen.model.visual, inputs["pixel_values"], inputs["image_grid_thw"]
    prompts = torch.randn(3, 4, 16, dtype=torch.float64)
    together, together_deepstack = vision_features(visual, pixels, grid, prompts)
    first = int(grid[0].prod())
    (one, one_deepstack), (two, two_deepstack) = (vision_features(visual, pixels[:first], grid[:1], prompts),
                                                  vision_features(visual, pixels[first:], grid[1:], prompts))
    torch.testing.assert_close(together, torch.cat([one, two]), rtol=0, atol=1e-12)  # float64; other batching
    for packed, a, b in zip(together_deepstack, one_deepstack, two_deepstack, strict=True):
        torch.testing.assert_close(packed, torch.cat([a, b]), rtol=0, atol=1e-12)


def test_only_the_prompts_and_the_interaction_layer_train(qwen):
    model = apply_m2pt(qwen, 2, 2)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    mergers = {f"qwen.model.visual.merger.{name}" for name, _ in qwen.model.visual.merger.named_parameters()}
    if hasattr(qwen.model.visual, "deepstack_merger_list"):  # Qwen3-VL's deepstack mergers join the vision side too
        mergers |= {f"qwen.model.visual.deepstack_merger_list.{name}"
                    for name, _ in qwen.model.visual.deepstack_merger_list.named_parameters()}
    assert trained == {"vision_prompts", "text_prompts"} | mergers
    layers = len(qwen.model.language_model.layers)
    assert model.vision_prompts.shape == (3, 2, 16) and model.text_prompts.shape == (layers, 2, 32)
    without = apply_m2pt(qwen, 2, 2, tune_projector=False)
    assert {name for name, p in without.named_parameters() if p.requires_grad} == {"vision_prompts", "text_prompts"}


def test_refusals(qwen):
    with pytest.raises(UserError, match="official_vision_features"):
        apply_m2pt(qwen, 2, 2, official_vision_features=True)
    model = apply_m2pt(qwen, 2, 2)
    inputs = batch()
    with pytest.raises(UserError, match="image_grid_thw"):
        model(**{**inputs, "image_grid_thw": None})
    short = inputs["input_ids"].clone()
    short[0, 3] = 5  # one image token fewer than the first image's features
    with pytest.raises(UserError, match="image tokens"):
        model(**{**inputs, "input_ids": short})


def loss_and_grads(model, backend, inputs):
    model.backend = backend
    loss = model(**inputs).loss
    tuned = {"vision_prompts": model.vision_prompts, "text_prompts": model.text_prompts,
             **interaction_parameters(model)}
    return loss, dict(zip(tuned, torch.autograd.grad(loss, list(tuned.values()))))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("first_token_labelled", [False, True], ids=["answers", "first-token-labelled"])
def test_fused_equals_the_reference_in_loss_and_every_gradient(qwen, checkpointing, first_token_labelled,
                                                               monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch paths (the Triton case is below)
    torch.manual_seed(4)
    model = apply_m2pt(qwen, 3, 2)
    inputs = batch(seed=5)
    if not first_token_labelled:  # the usual data: the first token (BOS) unlabelled
        inputs["labels"][:, 0] = IGNORE_INDEX
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    try:
        ref_loss, ref_grads = loss_and_grads(model, "reference", inputs)
        loss, grads = loss_and_grads(model, "fused", inputs)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    # float64 logits; the loss is an fp32 mean (reference) or an fp32 sum over label rows / count (fused)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-9, msg=name)


def test_fused_logits_equal_the_reference_where_there_are_tokens(qwen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = apply_m2pt(qwen, 3, 2)
    inputs = batch(seed=6)
    reference = model(**inputs).logits
    model.backend = "fused"
    fused = model(**inputs, return_logits=True).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(fused[valid], reference[valid], rtol=1e-10, atol=1e-12)  # float64


@pytest.mark.slow  # the Triton interpreter: 13-20 s each on 2 cores
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_through_the_triton_kernel_equals_the_reference(family, monkeypatch):
    """fp32 (the interpreter's dtype on a CPU): the prefix attention of every window, image and the
    decoder through the Triton kernel."""
    model = apply_m2pt(build(family, torch.float32), 2, 2)
    inputs = batch(seed=7)
    inputs["pixel_values"] = inputs["pixel_values"].float()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref_loss, ref_grads = loss_and_grads(model, "reference", inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launches = []  # guard: the Triton path must really run, not fall back to the reference
    kernel_forward = kernel_module._forward
    monkeypatch.setattr(kernel_module, "_forward", lambda *a: launches.append(1) or kernel_forward(*a))
    loss, grads = loss_and_grads(model, "fused", inputs)
    assert launches
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)  # fp32: the sums run in other orders
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def left_padded(inputs):
    """The batch with each row's padding moved before its tokens (what generate takes)."""
    out = dict(inputs)
    lengths = inputs["attention_mask"].sum(1)
    width = inputs["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        rows = [torch.cat([row.new_zeros(width - n), row[:n]]) for row, n in zip(inputs[key], lengths.tolist())]
        out[key] = torch.stack(rows)
    return out


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_generation_equals_a_greedy_loop_of_full_forwards(qwen, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(8)
    model = apply_m2pt(qwen, 3, 2, backend=backend)
    inputs = left_padded(batch(seed=9))
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    images = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    generated, step_logits = model.generate(ids, mask, **images, mm_token_type_ids=types, max_new_tokens=6,
                                            eos_token_id=[], output_logits=True)
    model.backend = "reference"  # full forwards of left-padded rows: the reference form
    expected, expected_logits = ids, []
    for _ in range(6):
        expected_logits.append(model(expected, mask, **images, mm_token_type_ids=types).logits[:, -1])
        expected = torch.cat([expected, expected_logits[-1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        types = torch.cat([types, types.new_zeros(types.shape[0], 1)], dim=1)
    assert torch.equal(generated, expected)
    # The logits too: this tiny model's tokens hardly depend on positions (1-D instead of M-RoPE
    # positions moves its logits by about 2e-4), its logits do. float64; the cache adds in other orders.
    torch.testing.assert_close(step_logits, torch.stack(expected_logits, dim=1), rtol=1e-9, atol=1e-11)


def test_generation_stops_at_eos_and_pads_finished_rows(qwen):
    model = apply_m2pt(qwen, 2, 2)
    inputs = left_padded(batch(seed=9))
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
            inputs["mm_token_type_ids"])
    free = model.generate(*args, max_new_tokens=4, eos_token_id=[])[:, -4:]
    stop = int(free[0, 1])  # the first row's second new token, made an end of sequence
    stopped = model.generate(*args, max_new_tokens=4, eos_token_id=stop, pad_token_id=0)[:, -4:]
    first_stop = [int((row == stop).nonzero()[0]) if (row == stop).any() else None for row in free]
    for row, cut in zip(range(2), first_stop):
        if cut is None:
            assert torch.equal(stopped[row, :stopped.shape[1]], free[row, :stopped.shape[1]])
        else:
            assert torch.equal(stopped[row, :cut + 1], free[row, :cut + 1])
            assert (stopped[row, cut + 1:] == 0).all()
