"""A one-minute look at M²PT on a tiny random LLaVA: `python -m m2pt_fast.demo`.

Builds the model, shows what is trained, fits the prompts and projector to one fixed batch for a few
dozen steps (the loss must fall), decodes with the KV cache, and writes the prompt file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from m2pt_fast import apply_m2pt, build_llava, llava_config, load_prompts, save_prompts, trainable_report


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Returns the loss before and after the fitting steps."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = llava_config("tiny-gqa")
    # A random frozen lm_head at LLaMA's 0.02 init caps every logit near ±1.3, so no prompt could
    # lower the loss much; 0.1 stands in for a trained model's larger weights (as the trainer's
    # embedded model does).
    config.text_config.initializer_range = 0.1
    model = apply_m2pt(build_llava(config, seed=args.seed), num_vision_prompts=4, num_text_prompts=4,
                       backend="fused")
    print(trainable_report(model))

    # One fixed batch: 4 images, each followed by 8 answer tokens the prompts must learn to produce.
    s, vocab = model.image_seq_length, model.llava.config.text_config.vocab_size
    ids = torch.cat([torch.ones(4, 1, dtype=torch.long), torch.full((4, s), model.image_token_id),
                     torch.randint(2, vocab - 1, (4, 8))], dim=1)
    labels = ids.clone()
    labels[:, : 1 + s] = -100
    pixels = torch.randn(4, 3, model.image_size, model.image_size)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    bar = tqdm(range(args.steps), desc="demo")
    first = None
    for _ in bar:
        loss = model(ids, pixels, labels=labels).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    final = model(ids, pixels, labels=labels).loss.item()
    print(f"loss {first:.3f} -> {final:.3f}")

    generated = model.generate(ids[:1, : 1 + s], pixels[:1], max_new_tokens=8)
    print("target   :", ids[0, 1 + s:].tolist())
    print("generated:", generated[0, 1 + s:].tolist())

    path = save_prompts(model, Path(args.output_dir) / "prompts.safetensors")
    load_prompts(model, path)
    print(f"prompt file: {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return first, final


if __name__ == "__main__":
    main()
