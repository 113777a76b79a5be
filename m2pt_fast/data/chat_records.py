"""Records in HF "messages" form, as TRL's VLM trainer takes them, for the chat-template models (Qwen-VL):

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}],
     "images": ["relative/or/absolute/path.png"]}

one per line of a .jsonl file, or a JSON list of them; image paths are relative to --image_folder.
Records whose images are missing are skipped before training (counted, with the first reasons
logged); a record found bad while training (an image that does not decode, a conversation the
encoder refuses) costs itself only: the next record is taken, and the batch names it in "skipped".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from m2pt_fast.data.chat_template import ChatTemplateEncoder, EncodedChat, collate_chats
from m2pt_fast.data.llava_json import first_good_record
from m2pt_fast.errors import MissingInput, UserError

log = logging.getLogger(__name__)


def load_chat_records(path: str | Path, image_folder: str | Path | None) -> list[dict[str, Any]]:
    """The usable records of `path` (.jsonl: one per line; else a JSON list), image paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--data_path {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as e:
        kind = "JSON Lines" if path.suffix == ".jsonl" else "JSON"
        raise UserError(f"--data_path {path} is not valid {kind}: {e}") from e
    if not isinstance(raw, list):
        raise UserError(f"--data_path {path} holds a {type(raw).__name__}; it must be a list of records")
    folder = Path(image_folder) if image_folder else path.parent
    records, skipped = [], []
    for index, record in enumerate(raw):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            skipped.append(f"record {index}: no 'messages' list")
            continue
        images = record.get("images") or []
        if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
            skipped.append(f"record {index}: 'images' must be a list of paths")
            continue
        paths = [str(folder / name) for name in images]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            skipped.append(f"record {index}: missing image {missing[0]}")
            continue
        records.append({"id": record.get("id", index), "messages": record["messages"], "images": paths})
    if skipped:
        log.warning("%d of %d records skipped before training (first: %s)", len(skipped), len(raw),
                    "; ".join(skipped[:3]))
    if not records:
        raise UserError(f"--data_path {path}: no usable record ({skipped[0] if skipped else 'the list is empty'})")
    return records


class ChatDataset(Dataset):
    """Records from `load_chat_records` through a ChatTemplateEncoder; images opened lazily, in the
    loader's workers. A record found bad costs itself only; the next ones are tried in turn."""

    def __init__(self, records: list[dict[str, Any]], encoder: ChatTemplateEncoder):
        self.records, self.encoder = records, encoder
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _encode(self, record) -> EncodedChat:
        images = []
        for name in record["images"]:
            with Image.open(name) as image:
                images.append(image.convert("RGB"))
        return self.encoder(record["messages"], images)

    def __getitem__(self, index: int) -> tuple[EncodedChat, list[str]]:
        # an undecodable image or a refused conversation costs its record only
        sample, skipped = first_good_record(self.records, self.bad, index, self._encode,
                                            lambda record, e: f"record {record['id']}: {type(e).__name__}: {e}")
        if sample is not None:
            return sample, skipped
        raise UserError(f"no record can be trained on (last: {skipped[-1] if skipped else 'none left'})")


def make_chat_collate(pad_token_id: int):
    """A collate of ChatDataset items: collate_chats' batch, with `skipped` listing bad records met."""

    def collate(items: list[tuple[EncodedChat, list[str]]]) -> dict[str, Any]:
        batch: dict[str, Any] = collate_chats([sample for sample, _ in items], pad_token_id)
        batch["skipped"] = [reason for _, reasons in items for reason in reasons]
        return batch

    return collate

