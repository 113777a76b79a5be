"""LLaVA-format instruction data: records, validation, datasets and the padding collate.

A record is {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}. Bad records are
skipped and counted, never a crash mid-epoch:
- at start (`load_llava_records`): malformed entries, no answer, over-long, a missing or unreadable
  image file (header check: cheap, no decoding);
- while training (`LlavaJsonDataset`): an image that fails to decode is replaced by the next record
  and reported in the batch (`skipped`), so every micro-batch keeps its size and every rank its step.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from m2pt_fast.data.conversation import IGNORE_INDEX, BadRecord, ConversationEncoder
from m2pt_fast.data.image import ImagePreprocessor
from m2pt_fast.data.synthetic import synthetic_record
from m2pt_fast.errors import MissingInput, UserError

log = logging.getLogger(__name__)

# Images fully decoded before training (spread over the set): if none decodes, the data is broken
# wholesale and the run stops before its first step.
DECODE_CHECK_SAMPLES = 16


@dataclass
class SkipReport:
    """Bad records seen while loading a data set: counts by kind, and the first few in full."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, error: Exception) -> None:
        kind = str(error).split(":", 1)[0]
        self.counts[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {error}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class SampleBuilder:
    """(image, conversations) -> {"input_ids", "labels", "pixel_values"} tensors for one sample."""

    def __init__(self, encoder: ConversationEncoder, preprocess: ImagePreprocessor):
        self.encoder = encoder
        self.preprocess = preprocess

    def __call__(self, image: Image.Image, conversations) -> dict[str, torch.Tensor]:
        encoded = self.encoder.encode(conversations)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": self.preprocess(image)}


def load_llava_records(
    data_path: str | Path, image_folder: str | Path | None, encoder: ConversationEncoder, *,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], SkipReport]:
    """The usable records of a LLaVA JSON file, and a report of the ones skipped.

    Every record's conversation is encoded and its image header read, so that bad records are
    dropped before training; `progress` shows a bar over that pass (large data sets take minutes).
    Raises ValueError when the file is unreadable or nothing in it is usable.
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        raise MissingInput(f"--data_path {data_path} does not exist")
    try:
        entries = json.loads(data_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"--data_path {data_path} is not UTF-8 text (byte {e.start}: {e.reason}): JSON files are "
                        "UTF-8; convert it, e.g. iconv -f latin1 -t utf-8") from e
    except json.JSONDecodeError as e:
        raise UserError(f"--data_path {data_path} is not valid JSON ({e}); expected a list of LLaVA records") from e
    if not isinstance(entries, list):
        raise UserError(f"--data_path {data_path} holds a {type(entries).__name__}; expected a list of LLaVA records")
    folder = Path(image_folder) if image_folder else data_path.parent

    records, report = [], SkipReport()
    for position, entry in enumerate(tqdm(entries, desc="checking records", unit="rec", disable=not progress)):
        where = f"{data_path.name}[{position}]"
        try:
            if not isinstance(entry, dict):
                raise BadRecord(f"malformed: entry is a {type(entry).__name__}, not an object")
            where += f" (id {entry.get('id', '?')})"
            if not isinstance(entry.get("image"), str):
                raise BadRecord("malformed: no 'image' file name (text-only records are not supported)")
            _check_image_header(folder / entry["image"])
            encoded = encoder.encode(entry.get("conversations"))
        except BadRecord as e:
            report.add(where, e)
            continue
        records.append({"id": str(entry.get("id", position)), "image": str(folder / entry["image"]),
                        "conversations": entry["conversations"], "tokens": int(encoded.input_ids.numel()),
                        "labelled": int((encoded.labels != IGNORE_INDEX).sum())})
    if report.total:
        log.warning(
            "skipped %d of %d records in %s (%s); first ones:\n  %s",
            report.total, len(entries), data_path, dict(report.counts), "\n  ".join(report.examples),
        )
    if not records:
        raise UserError(
            f"no usable record in {data_path} ({len(entries)} entries, {dict(report.counts)}): "
            "check --data_path and --image_folder"
        )
    return records, report


def longest_sample(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(the most tokens, the most labelled tokens) of any record from `load_llava_records`, as encoded
    (truncation included): a batch of b of them bounds what any step of b samples holds."""
    return max(r["tokens"] for r in records), max(r["labelled"] for r in records)


def _check_image_header(path: Path) -> None:
    if not path.is_file():
        raise BadRecord(f"missing image: {path} does not exist (is --image_folder right?)")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 -- reading the header is the check
    except Image.DecompressionBombError as e:
        raise BadRecord(f"image too large: {path} ({e}); PIL refuses it as a possible decompression bomb: "
                        "resize the image, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise BadRecord(f"corrupt image: {path} cannot be opened ({type(e).__name__})") from None


def _decode(record: dict[str, Any], build: SampleBuilder) -> dict[str, Any]:
    with Image.open(record["image"]) as image:
        image.load()
        return build(image, record["conversations"])


def check_images_decode(records: list[dict[str, Any]], build: SampleBuilder,
                        samples: int = DECODE_CHECK_SAMPLES) -> int:
    """Decode up to `samples` records' images, spread over the set; returns how many failed. Raises
    ValueError when none decodes: the data is broken wholesale, and training would only skip."""
    picks = sorted({round(i * (len(records) - 1) / max(samples - 1, 1)) for i in range(min(samples, len(records)))})
    failures = []
    for i in picks:
        try:
            _decode(records[i], build)
        except Exception as e:  # PIL raises many types for undecodable data
            failures.append(f"{records[i]['image']}: {type(e).__name__}: {e}")
    if picks and len(failures) == len(picks):
        raise UserError(f"none of the {len(picks)} images checked before training decodes (e.g. {failures[0]}): "
                        "the image files are broken or not images; check --image_folder")
    return len(failures)


def first_good_record(records: list, bad: set[int], index: int, decode, describe):
    """(decode(record), skipped reasons) for the first record from `index` on (wrapping round) that
    decodes; a record that fails joins `bad` (never tried again) and `describe(record, error)` names it.
    (None, reasons) when none is left."""
    skipped = []
    for attempt in range(len(records)):
        position = (index + attempt) % len(records)
        if position in bad:
            continue
        try:
            return decode(records[position]), skipped
        except Exception as e:  # a decode failure of any kind: skip the record, keep the step
            bad.add(position)
            skipped.append(describe(records[position], e))
    return None, skipped


class LlavaJsonDataset(Dataset):
    """Records from `load_llava_records`; images are opened lazily, in the loader's workers.

    An image that fails to decode costs its record only: the next records are tried in turn, however
    many fail in a row, and a record found bad is not decoded again by this worker.
    """

    def __init__(self, records: list[dict[str, Any]], build: SampleBuilder):
        self.records = records
        self.build = build
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample, skipped = first_good_record(
            self.records, self.bad, index, lambda record: _decode(record, self.build),
            lambda record, e: f"corrupt image: record {record['id']} ({record['image']}): {type(e).__name__}: {e}")
        if sample is not None:
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(f"no record's image decodes (last: {skipped[-1] if skipped else 'none left'}): "
                           "check the image files")


class SyntheticInstructDataset(Dataset):
    """`num_samples` synthetic records (data/synthetic.py), rendered when asked for."""

    def __init__(self, num_samples: int, seed: int, build: SampleBuilder):
        self.num_samples = num_samples
        self.seed = seed
        self.build = build

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = synthetic_record(self.seed, index)
        sample = self.build(record["image"], record["conversations"])
        sample["skipped"] = []
        return sample


def make_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A collate that right-pads samples into a batch; `skipped` lists bad records met on the way."""

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(s["input_ids"].numel() for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)  # (B, L)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
        for i, s in enumerate(samples):
            n = s["input_ids"].numel()
            input_ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, S, S)
            "skipped": [reason for s in samples for reason in s["skipped"]],
        }

    return collate
