"""Ask a model about one image, by hand: `python -m m2pt_fast.chat`.

    python -m m2pt_fast.chat --run_dir outputs/m2pt --image photo.jpg --question "What is in it?"
    python -m m2pt_fast.chat --run_dir outputs/m2pt --image photo.jpg      # one question per line

The model is chosen as `python -m m2pt_fast.evaluate` chooses it (a training run's output, another
output with --prompts, or a base model), and answers the same way: greedy, from its template.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m2pt_fast.data.conversation import TEMPLATES
from m2pt_fast.errors import UserError
from m2pt_fast.evaluation.benchmark_files import Question
from m2pt_fast.evaluation.evaluate import _distributed, answer, load_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m2pt_fast.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--question", help="one question; without it, questions are read one per line from stdin")
    p.add_argument("--run_dir")
    p.add_argument("--model_name_or_path")
    p.add_argument("--vision_tower")
    p.add_argument("--pretrain_mm_mlp_adapter")
    p.add_argument("--prompts")
    p.add_argument("--conv_mode", choices=sorted(TEMPLATES))
    p.add_argument("--max_new_tokens", type=int, default=128)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    image = Path(args.image)
    if not image.is_file():
        print(f"chat: error: --image {image} does not exist", file=sys.stderr)
        return 2
    try:
        _, _, device = _distributed()
        model, tokenizer, encoder, preprocess, _ = load_model(args, device)
    except (UserError, FileNotFoundError) as e:
        print(f"chat: error: {e}", file=sys.stderr)
        return 2

    def ask(text: str) -> str:
        return answer(model, tokenizer, encoder, preprocess, [Question("chat", "0", image, text, None)], 1,
                      args.max_new_tokens, device, progress=False)[0]

    if args.question is not None:
        print(ask(args.question))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            print(ask(line.strip()), flush=True)
