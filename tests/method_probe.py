"""A training run that also reports, for tests/test_methods.py, what it changed and what its output gives.

Run like m2pt_fast/train.py (any launcher, the same options). Rank 0 writes <output_dir>/probe.json:
  changed     names of the parameters whose values differ after training from before it
  trainable   names of the parameters that require grad
  trained_loss, loaded_loss   the loss of one fixed batch under the trained model, and under the
              run's output (prompt file, PEFT adapter, model directory) loaded onto a freshly built base
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from m2pt_fast.method.methods import OUTPUT_NAMES, load_output
from m2pt_fast.training.config import parse_args
from m2pt_fast.training.recipe import M2PTRecipe


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    return out.loss.item()


def main() -> int:
    cfg = parse_args(sys.argv[1:])
    recipe = M2PTRecipe(cfg)
    try:
        recipe.setup()
        before = {name: p.detach().clone() for name, p in recipe.model.named_parameters()}
        batch = next(iter(recipe.loader))
        code = recipe.train()
        if code or recipe.rank != 0:
            return code
        model = recipe.model
        report = {
            "changed": sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "trained_loss": batch_loss(model, batch),
        }
        loaded = load_output(recipe.base_llava(), Path(cfg.output_dir) / OUTPUT_NAMES[cfg.method])
        report["loaded_loss"] = batch_loss(loaded, batch)
        (Path(cfg.output_dir) / "probe.json").write_text(json.dumps(report, indent=1))
        return 0
    finally:
        if dist.is_initialized():
            dist.barrier()
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(main())
