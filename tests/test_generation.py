"""Generation (transformers' generate, prompt K/V as the cache prefix) against a greedy loop over full forwards."""
import pytest
import torch
from model_inputs import make_batch

from m2pt_fast import apply_m2pt, build_llava


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-siglip-qwen2"])
def model(request):
    llava = build_llava(request.param, seed=3)
    llava.generation_config.eos_token_id = None  # the oracle loop below never stops early
    # a generated image token would make the oracle's next full forward one image token too many
    llava.generation_config.suppress_tokens = [llava.config.image_token_id]
    return apply_m2pt(llava, 4, 5)


def greedy_loop(model, ids, pixels, steps):
    """The oracle: no cache, the whole sequence re-run for every new token (never the image token,
    which the fixture's generation config suppresses too)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, pixels).logits[:, -1]
        if model.llava.generation_config.suppress_tokens:
            logits[:, model.llava.generation_config.suppress_tokens] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_generation_equals_full_forward_loop(model):
    ids, pixels, _ = make_batch(model, batch=2, seed=11)
    generated = model.generate(ids, pixels, max_new_tokens=6)
    assert generated.shape == (2, ids.shape[1] + 6)
    assert torch.equal(generated, greedy_loop(model, ids, pixels, 6))


def test_left_padded_batch_equals_each_row_alone(model):
    ids, pixels, _ = make_batch(model, batch=2, seed=12)
    short = ids[1:, 3:]  # row 1 without its first three text tokens, left-padded back to full width
    batch_ids = torch.cat([ids[:1], torch.cat([torch.zeros(1, 3, dtype=ids.dtype), short], 1)])
    mask = torch.ones_like(batch_ids)
    mask[1, :3] = 0
    generated = model.generate(batch_ids, pixels, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(generated[0], greedy_loop(model, ids[:1], pixels[:1], 5)[0])
    assert torch.equal(generated[1, 3:], greedy_loop(model, short, pixels[1:], 5)[0])


def test_text_only_generation(model):
    ids, _, _ = make_batch(model, batch=1, images=False, seed=13)
    assert torch.equal(model.generate(ids, None, max_new_tokens=4), greedy_loop(model, ids, None, 4))


def test_eos_stops_and_pads(model):
    ids, pixels, _ = make_batch(model, batch=1, seed=14)
    free = model.generate(ids, pixels, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # make the second new token the end of sequence
    stopped = model.generate(ids, pixels, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(stopped, free[:, : ids.shape[1] + 2])


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    ids, pixels, _ = make_batch(model, batch=2, seed=15)
    def run(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(ids, pixels, max_new_tokens=5, do_sample=True, **kw)

    assert torch.equal(run(0, temperature=1.5), run(0, temperature=1.5))
    assert torch.equal(run(1, top_k=1), model.generate(ids, pixels, max_new_tokens=5))
    # a nucleus this small keeps only the most likely token
    assert torch.equal(run(2, top_p=1e-6), model.generate(ids, pixels, max_new_tokens=5))
    samples = torch.stack([run(s, temperature=2.0)[:, ids.shape[1]:] for s in range(6)])
    assert len({tuple(x.flatten().tolist()) for x in samples}) > 1  # sampling really samples


def test_right_padding_is_refused(model):
    ids, pixels, _ = make_batch(model, batch=2, seed=16)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, pixels, attention_mask=mask)


def test_beam_search_runs_on_the_prompt_cache(model):
    # num_beams=1 with the same budget is greedy; 3 beams keep the sequences' shape and start
    ids, pixels, _ = make_batch(model, batch=2, seed=17)
    beams = model.generate(ids, pixels, max_new_tokens=4, num_beams=3)
    assert beams.shape == (2, ids.shape[1] + 4) and torch.equal(beams[:, : ids.shape[1]], ids)
    best = greedy_loop(model, ids, pixels, 1)
    first = model.generate(ids, pixels, max_new_tokens=1, num_beams=3)
    assert torch.equal(first, best)  # one step: the best beam is the most likely token


def test_generation_leaves_the_training_mode_as_it_was(model):
    ids, pixels, _ = make_batch(model, batch=1, seed=18)
    model.train()
    model.gradient_checkpointing_enable()
    try:
        assert torch.equal(model.generate(ids, pixels, max_new_tokens=3), greedy_loop(model.eval(), ids, pixels, 3))
        model.train()
        model.generate(ids, pixels, max_new_tokens=1)
        assert model.training
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_several_returned_sequences_per_input(model):
    ids, pixels, _ = make_batch(model, batch=2, seed=19)
    torch.manual_seed(0)
    out = model.generate(ids, pixels, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, 0))
