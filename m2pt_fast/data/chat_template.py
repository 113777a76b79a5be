"""HF "messages" conversations through a model's own chat template and image processor, as Qwen2.5-VL's
and Qwen3-VL's processors prepare them, with labels on the assistant turns only.

A conversation is what TRL's VLM trainer and transformers' chat templates take:
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
with one image per {"type": "image"} part, in order. The text is the tokenizer's own
apply_chat_template; each image token the template writes (Qwen's <|image_pad|>) becomes
t·h·w / merge² copies, the image processor's grid (image_grid_thw) merged merge × merge, as the
model's processor expands it, so the image tokens number the merged rows the vision tower gives.

Labels: the tokens of each assistant turn's content and its end-of-turn token (Qwen's <|im_end|>),
nothing else: not the template's "<|im_start|>assistant\\n" header, not the newline after the turn,
never an image token. A turn is located by rendering the conversation up to it (with the generation
prompt) and through it: the template must render a conversation's beginning as the beginning of its
rendering (Qwen's do), else the record is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from m2pt_fast.data.conversation import BadRecord
from m2pt_fast.labels import IGNORE_INDEX

QWEN_IMAGE_TOKEN = "<|image_pad|>"


@dataclass(frozen=True)
class EncodedChat:
    input_ids: torch.Tensor  # (L,) int64, each image token expanded
    labels: torch.Tensor  # (L,) int64, IGNORE_INDEX except assistant tokens
    mm_token_type_ids: torch.Tensor  # (L,) int64, 1 at image tokens (the processor's)
    pixel_values: torch.Tensor  # (patches, channels · temporal_patch · patch²), the image processor's
    image_grid_thw: torch.Tensor  # (images, 3)


def _image_parts(messages) -> int:
    """The number of image parts of a conversation, checking its shape (BadRecord where it is not one)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("messages must be a non-empty list of {'role', 'content'} turns")
    count = 0
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadRecord(f"every turn needs a role and a content, got {turn!r:.80}")
        content = turn["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRecord(f"a turn's content is a string or a list of parts, got {type(content).__name__}")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("image", "text"):
                raise BadRecord("a content part is {'type': 'image'} or {'type': 'text', 'text': ...}, "
                                f"got {part!r:.80}")
            count += kind == "image"
    if not any(turn["role"] == "assistant" for turn in messages):
        raise BadRecord("the conversation has no assistant turn: nothing to learn")
    return count


class ChatTemplateEncoder:
    """Turns (messages, images) into an EncodedChat with `tokenizer`'s chat template (a fast tokenizer:
    labels come from its offsets) and `image_processor` (Qwen2-VL's, merging merge_size² patches).

    max_length: samples longer are truncated; a truncation that would cut into image tokens or leave no
    label is a BadRecord."""

    def __init__(self, tokenizer, image_processor, *, image_token: str = QWEN_IMAGE_TOKEN,
                 max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ChatTemplateEncoder needs a fast tokenizer (its offsets place the labels)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise BadRecord("the tokenizer has no chat template: a Qwen-VL model directory's tokenizer_config.json "
                            "or chat_template.jinja holds it")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token, self.max_length = image_token, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.merge = image_processor.merge_size

    def _render(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def _expand(self, text: str, counts: list[int]) -> str:
        """`text` with its k-th image token repeated counts[k] times."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 > len(counts):
            raise BadRecord(f"the chat template wrote {len(pieces) - 1} image tokens for {len(counts)} image(s)")
        return pieces[0] + "".join(self.image_token * counts[k] + piece for k, piece in enumerate(pieces[1:]))

    def __call__(self, messages, images) -> EncodedChat:
        parts = _image_parts(messages)
        if parts != len(images):
            raise BadRecord(f"the conversation has {parts} image part(s) and the record {len(images)} image(s)")
        if images:
            processed = self.image_processor(images=list(images), return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        else:
            pixel_values, grid = torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long)
        counts = [int(g.prod()) // self.merge**2 for g in grid]
        text = self._render(messages)
        if text.count(self.image_token) != len(images):
            raise BadRecord(f"the chat template wrote {text.count(self.image_token)} image tokens for "
                            f"{len(images)} image(s)")
        expanded = self._expand(text, counts)
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self._expand(self._render(messages[:i], add_generation_prompt=True), counts)
            through = self._expand(self._render(messages[:i + 1]), counts)
            if not (expanded.startswith(before) and expanded.startswith(through)):
                raise BadRecord("the chat template does not render a conversation's beginning as the beginning "
                                "of its rendering: its assistant turns cannot be located")
            end = len(through)
            while end > len(before) and through[end - 1].isspace():
                end -= 1  # the newline after the end-of-turn token is the template's, not the answer's
            spans.append((len(before), end))
        tokens = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(tokens["input_ids"], dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for k, (start, _) in enumerate(tokens["offset_mapping"]):
            if any(a <= start < b for a, b in spans) and ids[k] != self.image_token_id:
                labels[k] = ids[k]
        if self.max_length is not None and ids.numel() > self.max_length:
            if (ids[self.max_length:] == self.image_token_id).any():
                raise BadRecord(f"{ids.numel()} tokens: truncating to max_length {self.max_length} would cut "
                                "into the image tokens")
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        if (labels == IGNORE_INDEX).all():
            raise BadRecord("no assistant token is left to learn from (truncated away, or empty answers)")
        return EncodedChat(ids, labels, (ids == self.image_token_id).long(), pixel_values, grid)


def collate_chats(samples: list[EncodedChat], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask, labels, mm_token_type_ids (B, T), and the
    images of every sample in order: pixel_values (patches, d), image_grid_thw (images, 3)."""
    length = max(s.input_ids.numel() for s in samples)

    def pad(tensor, value):
        return torch.cat([tensor, tensor.new_full((length - tensor.numel(),), value)])

    batch = {
        "input_ids": torch.stack([pad(s.input_ids, pad_token_id) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s.input_ids), 0) for s in samples]),
        "labels": torch.stack([pad(s.labels, IGNORE_INDEX) for s in samples]),
        "mm_token_type_ids": torch.stack([pad(s.mm_token_type_ids, 0) for s in samples]),
    }
    with_images = [s for s in samples if s.image_grid_thw.numel()]
    if with_images:
        batch["pixel_values"] = torch.cat([s.pixel_values for s in with_images])
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    return batch
