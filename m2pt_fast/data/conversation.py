"""LLaVA's conversation templates, as LLaVA trains with them, turned into input_ids and labels.

  v1 (Vicuna v1, the paper's) and llava_v1 (the same with LLaVA's system prompt):
    "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
  plain (projector-only pretraining data, one caption per image):
    "<image>{caption}\\n"

Token for token what LLaVA's preprocess_v1 / preprocess_plain give with its tokenizer_image_token:
the text before the image ("{system} USER: ", its trailing space included: a LLaMA tokenizer makes
it a token of its own) is tokenized apart from the text after it.

The text around the image is tokenized in pieces (as LLaVA's tokenizer_image_token does) and the
ids concatenated, so the label mask is exact by construction (LLaVA recovers it by re-tokenizing
rounds and subtracting lengths, which is off by one or two tokens for some tokenizers). An answer
is tokenized in context: the ids of "question ASSISTANT: answer" past those of "question
ASSISTANT:", so a SentencePiece tokenizer gives "▁yes" as in running text, not a stray "▁" first.
Only the answers and their </s> are supervised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2pt_fast.errors import UserError
from m2pt_fast.labels import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# --version: LLaVA's conv_templates names; the system prompt of each (None: the plain template)
TEMPLATES = {"v1": SYSTEM_PROMPT, "llava_v1": LLAVA_SYSTEM_PROMPT, "plain": None}
USER, ASSISTANT = "USER", "ASSISTANT"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class BadRecord(UserError):
    """A data record that cannot be trained on; the message says what is wrong with it."""


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: torch.Tensor  # (L,) int64, image placeholder expanded to image_seq_length ids
    labels: torch.Tensor  # (L,) int64, IGNORE_INDEX except answer tokens


class ConversationEncoder:
    """Turns a LLaVA `conversations` list into (input_ids, labels) for one image.

    The `<image>` placeholder goes at the start of the first human turn (moved there if written
    elsewhere, added if missing) and becomes `image_seq_length` copies of `image_token_id`.
    Samples longer than `max_length` are truncated; a sample whose truncation would cut into the
    image tokens or leave no answer token is a BadRecord.
    """

    def __init__(self, tokenizer, image_token_id: int, image_seq_length: int, max_length: int,
                 version: str = "v1"):
        if version not in TEMPLATES:
            raise UserError(f"--version must be one of {sorted(TEMPLATES)} (LLaVA's templates), got {version!r}")
        if tokenizer.eos_token_id is None and version != "plain":
            raise UserError("the tokenizer has no eos_token: the Vicuna v1 template ends answers with </s>")
        self.version = version
        self.system = TEMPLATES[version]
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.max_length = max_length

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _round(self, prompt_text: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) for one round, the answer tokenized in context where possible."""
        prompt = self._ids(prompt_text)
        whole = self._ids(f"{prompt_text} {answer}")
        if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
            return prompt, whole[len(prompt):]
        return prompt, self._ids(" " + answer)  # a token merged across the boundary: tokenize apart

    def encode(self, conversations) -> EncodedConversation:
        turns = _validated_turns(conversations)
        ids: list[int] = []
        labels: list[int] = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        if self.version == "plain":
            # LLaVA's preprocess_plain: the question is replaced by the image; the caption and the
            # separator "\n" are supervised (no </s>)
            if len(turns) != 1:
                raise BadRecord(f"malformed: the plain template takes one caption per image, got {len(turns)} rounds")
            caption = self._ids(turns[0][1] + "\n")
            ids += [self.image_token_id] * self.image_seq_length + caption
            labels += [IGNORE_INDEX] * self.image_seq_length + caption
            return self._truncated(ids, labels)
        for i, (question, answer) in enumerate(turns):
            if i == 0:
                question = question.replace(IMAGE_PLACEHOLDER, "").strip()
                # the space before the image stays: LLaVA tokenizes "{system} USER: " up to the image
                prompt = self._ids(f"{self.system} {USER}: ") + [self.image_token_id] * self.image_seq_length
                after_image, reply = self._round(f"\n{question} {ASSISTANT}:", answer)
                prompt += after_image
            else:
                prompt, reply = self._round(f"{USER}: {question} {ASSISTANT}:", answer)
            reply = reply + [self.tokenizer.eos_token_id]
            ids += prompt + reply
            labels += [IGNORE_INDEX] * len(prompt) + reply
        return self._truncated(ids, labels)

    def encode_prompt(self, question: str) -> list[int]:
        """The ids a model answers from, as LLaVA's inference builds them: the first round up to and
        including "ASSISTANT:" (the image at the front of the question), or for plain the image alone."""
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        image = [self.image_token_id] * self.image_seq_length
        if self.version == "plain":
            return ids + image
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        return ids + self._ids(f"{self.system} {USER}: ") + image + self._ids(f"\n{question} {ASSISTANT}:")

    def _truncated(self, ids: list[int], labels: list[int]) -> EncodedConversation:
        if len(ids) > self.max_length:
            image_end = ids.index(self.image_token_id) + self.image_seq_length
            if image_end > self.max_length:
                raise BadRecord(
                    f"over-long: the image tokens end at position {image_end} but --model_max_length is "
                    f"{self.max_length}; raise --model_max_length"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise BadRecord(
                    f"over-long: no answer token fits in --model_max_length {self.max_length}; raise it"
                )
        return EncodedConversation(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def _validated_turns(conversations) -> list[tuple[str, str]]:
    """(question, answer) pairs from a LLaVA conversation list, or BadRecord saying what is wrong."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("malformed: 'conversations' must be a non-empty list of {'from', 'value'} turns")
    turns: list[tuple[str, str]] = []
    question = None
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise BadRecord(f"malformed: turn {k} is not a {{'from': ..., 'value': <str>}} object")
        role = turn["from"]
        if role in HUMAN_ROLES:
            if question is not None:
                raise BadRecord(f"malformed: turn {k} is a second human turn in a row")
            question = turn["value"]
        elif role in ASSISTANT_ROLES:
            if question is None:
                raise BadRecord(f"malformed: turn {k} is an answer with no question before it")
            if not turn["value"].strip():
                raise BadRecord(f"no answer: turn {k} is an empty answer")
            turns.append((question, turn["value"].strip()))
            question = None
        else:
            raise BadRecord(f"malformed: turn {k} has role {role!r}; expected one of {HUMAN_ROLES + ASSISTANT_ROLES}")
    if not turns:
        raise BadRecord("no answer: the conversation has no assistant turn")
    for k, (q, _) in enumerate(turns[1:], start=1):
        if IMAGE_PLACEHOLDER in q:
            raise BadRecord(f"malformed: {IMAGE_PLACEHOLDER} appears in question {k}; only one image per sample")
    return turns
