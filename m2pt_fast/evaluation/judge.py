"""A local judge model for free-form answers: the M²PT paper's protocol, `evaluate --judge_model_name_or_path`.

The paper scored its held-out tasks by asking a Vicuna-13B-v1.5 judge whether each prediction is
correct, given the question and the reference answer. The released code does not include the
judge's prompt, so the question below is ours (JUDGE_QUESTION), asked in the judge's chat template
(its tokenizer's, else Vicuna v1's, the template Vicuna was trained with), answered greedily (the
paper sampled at temperature 0.2; greedy makes a score repeatable) in at most a few tokens; a reply
whose first word is "yes" is a correct answer, anything else is not. Local files only.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from m2pt_fast import compat
from m2pt_fast.data.conversation import ASSISTANT, SYSTEM_PROMPT, USER
from m2pt_fast.errors import UserError

JUDGE_QUESTION = (
    "Decide whether a model's answer to a question about an image is correct.\n"
    "Question: {question}\nReference answer: {target}\nModel's answer: {prediction}\n"
    "Is the model's answer correct? Answer yes or no."
)
JUDGE_MAX_NEW_TOKENS = 4


def judge_prompt(question: str, target, prediction: str) -> str:
    if isinstance(target, (list, tuple)):  # TextVQA's ten answers: the most common one is the reference
        target = max(set(target), key=list(target).count) if target else ""
    return JUDGE_QUESTION.format(question=question.strip(), target=str(target).strip(), prediction=prediction.strip())


def verdict(reply: str) -> bool:
    """True when the judge's reply begins with the word yes (any case, punctuation ignored)."""
    words = re.findall(r"[a-z]+", reply.lower())
    return bool(words) and words[0] == "yes"


class Judge:
    """A causal LM from a local directory that rules on (question, reference, prediction) triples."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype | None = None):
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--judge_model_name_or_path {path}: no config.json there (a local causal LM "
                            "directory, e.g. vicuna-13b-v1.5; nothing is downloaded)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = compat.from_pretrained(AutoModelForCausalLM, path, dtype=dtype).to(device).eval()
        self.device = device

    def _chat(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{SYSTEM_PROMPT} {USER}: {text} {ASSISTANT}:"

    @torch.no_grad()
    def rule(self, triples: list[tuple[str, object, str]], batch_size: int = 8) -> list[bool]:
        """One verdict per (question, reference, prediction), greedy, `batch_size` at a time."""
        verdicts: list[bool] = []
        tokenizer = self.tokenizer
        for start in range(0, len(triples), batch_size):
            texts = [self._chat(judge_prompt(*t)) for t in triples[start:start + batch_size]]
            ids = [tokenizer(t, add_special_tokens=not t.startswith(tokenizer.bos_token or "\0"))["input_ids"]
                   for t in texts]
            width = max(len(i) for i in ids)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=JUDGE_MAX_NEW_TOKENS, pad_token_id=pad,
                                      eos_token_id=tokenizer.eos_token_id)
            verdicts += [verdict(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]
        return verdicts
