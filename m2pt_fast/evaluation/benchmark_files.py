"""The zero-shot benchmarks as users download them, read into one question list.

  mme        the MME release: one folder per subtask (14), each with its images and, per image, a
             .txt of two "question<TAB>Yes|No" lines, either side by side or as images/ beside
             questions_answers_YN/
  pope       coco_pope_{adversarial,popular,random}.json (JSON lines despite the name: question_id,
             image, text, label) and the COCO val2014 images (--image_folder, default <data_dir>/val2014)
  textvqa    TextVQA_0.5.1_val.json (data: question_id, question, image_id, answers) and its images
             (--image_folder, default <data_dir>/train_images: the release keeps val images there);
             with TextVQA_Rosetta_OCR_v0.2_val.json beside it, LLaVA-1.5's "Reference OCR token:" line
  vsr        a VSR split's jsonl (image, caption, label 0/1) and its COCO images (--image_folder,
             default <data_dir>/images)
  snli_ve    the SNLI-VE generator's jsonl (Flickr30K_ID or Flikr30kID, sentence2, gold_label) and the
             Flickr30k images <id>.jpg (--image_folder, default <data_dir>/flickr30k_images)
  synthetic  the embedded demo's own test (no files): questions of the trained families on images the
             run never saw ("synthetic_seen") and of the held-out families ("synthetic_held_out")
  <task>     an M²PT held-out task file <data_dir>/<task>.jsonl (unique_id, image_path, prompt,
             target): cifar_10, cifar_100, mnist, snli_ve_classification, visual_spatial_reasoning,
             text_vqa, pope_adv, pope_pop, pope_rand
And LLaVA's own question files (evaluate --question_file; `load_llava_questions`): one JSON object per
line with question_id, image and text, the prompt as LLaVA asks it.
A malformed record or a missing image costs that question only: it is skipped and counted
(`LoadReport`); a missing file or folder is an error naming it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2pt_fast.data import held_out_record, synthetic_record
from m2pt_fast.data.conversation import IMAGE_PLACEHOLDER
from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.evaluation.scorers import MME_COGNITION, MME_PERCEPTION, POPE_SPLITS

M2PT_TASKS = ("cifar_10", "cifar_100", "mnist", "snli_ve_classification", "visual_spatial_reasoning", "text_vqa",
              "pope_adv", "pope_pop", "pope_rand")
BENCHMARKS = ("synthetic", "mme", "pope", "textvqa", "vsr", "snli_ve", *M2PT_TASKS)
SYNTHETIC_QUESTIONS = 120  # per part (seen, held out)
SYNTHETIC_FIRST_INDEX = 1_000_000  # past any training set's indices: images the run never saw
SNLI_LABELS = ("entailment", "neutral", "contradiction")
# How VSR and SNLI-VE are asked (neither benchmark ships an instruction; these are ours, documented)
VSR_PROMPT = 'Is this statement about the image true: "{caption}"? Answer yes or no.'
SNLI_VE_PROMPT = ('Does the image entail, contradict, or neither the sentence "{sentence}"? Answer with one word: '
                  "entailment, neutral or contradiction.")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# LLaVA-1.5's instruction for short answers, appended where its question files append it (POPE)
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Question:
    benchmark: str
    question_id: str
    image: Path
    text: str  # what the model is asked, instructions included
    target: Any  # "Yes"/"No" (MME), "yes"/"no" (POPE), the task's target
    extra: dict = field(default_factory=dict)  # category (MME subtask, POPE split), the raw question


@dataclass
class LoadReport:
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}


def load_mme(root: Path, report: LoadReport) -> list[Question]:
    if not root.is_dir():
        raise MissingInput(f"MME: {root} is not a directory (the release's folder of 14 subtasks)")
    questions = []
    found = [c for c in MME_PERCEPTION + MME_COGNITION if (root / c).is_dir()]
    if not found:
        raise MissingInput(f"MME: {root} holds none of the 14 subtask folders ({', '.join(MME_PERCEPTION)}, ...)")
    for category in found:
        folder = root / category
        texts_dir = folder / "questions_answers_YN" if (folder / "questions_answers_YN").is_dir() else folder
        images = _images_in(folder / "images") or _images_in(folder)
        for text_file in sorted(texts_dir.glob("*.txt")):
            image = images.get(text_file.stem)
            if image is None:
                report.skip("MME: no image for its questions")
                continue
            for k, line in enumerate(text_file.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                question, sep, answer = line.rpartition("\t")
                if not sep or answer.strip() not in ("Yes", "No"):
                    report.skip("MME: a line that is not question<TAB>Yes|No")
                    continue
                questions.append(Question("mme", f"{category}/{text_file.stem}/{k}", image, question.strip(),
                                          answer.strip(), {"category": category, "question": question.strip()}))
    return questions


def _json_lines(path: Path, report: LoadReport, what: str) -> list[dict]:
    if not path.is_file():
        raise MissingInput(f"{what}: {path} does not exist")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.skip(f"{what}: a line that is not JSON")
            continue
        rows.append(row) if isinstance(row, dict) else report.skip(f"{what}: a line that is not an object")
    return rows


def load_pope(data_dir: Path, image_folder: Path, report: LoadReport) -> list[Question]:
    questions = []
    for split in POPE_SPLITS:
        for row in _json_lines(data_dir / f"coco_pope_{split}.json", report, "POPE"):
            try:
                image, text, label = image_folder / row["image"], row["text"], row["label"].strip().lower()
                question_id = str(row["question_id"])
            except (KeyError, AttributeError, TypeError):
                report.skip("POPE: a record without question_id, image, text and label")
                continue
            if label not in ("yes", "no"):
                report.skip("POPE: a label that is not yes or no")
            elif not image.is_file():
                report.skip("POPE: a missing image")
            else:
                questions.append(Question(f"pope_{split}", question_id, image, f"{text}\n{SHORT_ANSWER}", label,
                                          {"category": split, "question": text}))
    return questions


def load_task(data_dir: Path, task: str, report: LoadReport) -> list[Question]:
    questions = []
    for row in _json_lines(data_dir / f"{task}.jsonl", report, task):
        try:
            image, prompt, target, uid = row["image_path"], row["prompt"], row["target"], str(row["unique_id"])
        except KeyError:
            report.skip(f"{task}: a record without unique_id, image_path, prompt and target")
            continue
        path = Path(image) if Path(image).is_absolute() else data_dir / image
        if not path.is_file():
            report.skip(f"{task}: a missing image")
            continue
        questions.append(Question(task, uid, path, str(prompt), target, {"question": str(prompt)}))
    return questions


ANSWER_FIELDS = ("answer", "label", "gt_answer")  # where a question file may carry its answer


def load_llava_questions(path: Path, image_folder: Path | None, report: LoadReport) -> list[Question]:
    """A LLaVA question file, as its model_vqa_loader reads one (llava_mme.jsonl, llava_pope_test.jsonl,
    llava_textvqa_val_v051_ocr.jsonl, ...): question_id, image (relative to `image_folder`, default the
    file's folder) and text, asked exactly as written, instructions included. The benchmark is named
    by the file's stem; a record's category is kept; an answer (ANSWER_FIELDS) makes it scorable."""
    if path.stem in BENCHMARKS or path.stem.startswith(("pope_", "synthetic_")):
        raise UserError(f"{path}: a question file named like the built-in benchmark {path.stem!r} would be scored "
                        "as that one; rename the file")
    images = image_folder or path.parent
    questions = []
    for row in _json_lines(path, report, path.name):
        try:
            raw_id, image, text = row["question_id"], row["image"], row["text"]
        except KeyError:
            report.skip(f"{path.name}: a record without question_id, image and text")
            continue
        if not isinstance(text, str) or not isinstance(image, str):
            report.skip(f"{path.name}: a record whose image or text is not a string")
            continue
        if not (images / image).is_file():
            report.skip(f"{path.name}: a missing image")
            continue
        target = next((row[k] for k in ANSWER_FIELDS if row.get(k) is not None), None)
        extra = {"question": text, "llava_question_id": raw_id}
        if row.get("category") is not None:
            extra["category"] = row["category"]
        questions.append(Question(path.stem, str(raw_id), images / image, text, target, extra))
    return questions


def _json_file(path: Path, what: str):
    if not path.is_file():
        raise MissingInput(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not JSON ({e})") from e


def load_textvqa(data_dir: Path, image_folder: Path, report: LoadReport) -> list[Question]:
    records = _json_file(data_dir / "TextVQA_0.5.1_val.json", "TextVQA")
    ocr_path = data_dir / "TextVQA_Rosetta_OCR_v0.2_val.json"
    ocr = {}
    if ocr_path.is_file():
        ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in _json_file(ocr_path, "TextVQA OCR")["data"]
               if isinstance(r, dict) and "image_id" in r}
    questions = []
    for row in records.get("data", []) if isinstance(records, dict) else []:
        try:
            qid, question, image_id, answers = str(row["question_id"]), row["question"], row["image_id"], row["answers"]
        except (KeyError, TypeError):
            report.skip("TextVQA: a record without question_id, question, image_id and answers")
            continue
        image = image_folder / f"{image_id}.jpg"
        if not image.is_file():
            report.skip("TextVQA: a missing image")
            continue
        text = question
        if image_id in ocr:
            text += "\nReference OCR token: " + ", ".join(ocr[image_id])
        questions.append(Question("textvqa", qid, image, f"{text}\n{SHORT_ANSWER}", list(answers),
                                  {"question": question}))
    return questions


def _split_rows(data_dir: Path, report: LoadReport, what: str, fields: str):
    """(record id, row) of every line of every .jsonl file in data_dir (the benchmark's splits)."""
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise MissingInput(f"{what}: {data_dir} holds no .jsonl file ({fields})")
    for path in files:
        for k, row in enumerate(_json_lines(path, report, what)):
            yield f"{path.stem}/{k}", row


def load_vsr(data_dir: Path, image_folder: Path, report: LoadReport) -> list[Question]:
    questions = []
    for record_id, row in _split_rows(data_dir, report, "VSR", "random or zeroshot split: image, caption, label"):
        try:
            image, caption, label = image_folder / row["image"], row["caption"], int(row["label"])
        except (KeyError, TypeError, ValueError):
            report.skip("VSR: a record without image, caption and a 0/1 label")
            continue
        if not image.is_file():
            report.skip("VSR: a missing image")
            continue
        questions.append(Question("vsr", record_id, image, VSR_PROMPT.format(caption=caption),
                                  "yes" if label else "no", {"question": caption}))
    return questions


def load_snli_ve(data_dir: Path, image_folder: Path, report: LoadReport) -> list[Question]:
    questions = []
    for record_id, row in _split_rows(data_dir, report, "SNLI-VE", "Flickr30K_ID, sentence2, gold_label"):
        image_id = row.get("Flickr30K_ID", row.get("Flikr30kID"))  # the generator spells it both ways
        label, sentence = row.get("gold_label"), row.get("sentence2")
        if image_id is None or not isinstance(sentence, str) or label not in SNLI_LABELS:
            report.skip("SNLI-VE: a record without an image id, sentence2 and a gold_label")
            continue
        image = image_folder / f"{image_id}.jpg"
        if not image.is_file():
            report.skip("SNLI-VE: a missing image")
            continue
        questions.append(Question("snli_ve", record_id, image, SNLI_VE_PROMPT.format(sentence=sentence),
                                  label, {"question": sentence, "options": list(SNLI_LABELS)}))
    return questions


def load_synthetic(seed: int, count: int = SYNTHETIC_QUESTIONS) -> list[Question]:
    questions = []
    for k in range(count):
        record = synthetic_record(seed, SYNTHETIC_FIRST_INDEX + k)
        question = record["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        questions.append(Question("synthetic_seen", record["id"], record["image"], question,
                                  record["conversations"][1]["value"], {"question": question}))
    for k in range(count):
        record = held_out_record(seed, k)
        questions.append(Question("synthetic_held_out", record["id"], record["image"], record["question"],
                                  record["answer"], {"question": record["question"], "family": record["family"]}))
    return questions


def load_benchmark(name: str, data_dir: str | Path | None, image_folder: str | Path | None = None,
                   report: LoadReport | None = None, seed: int = 42) -> list[Question]:
    """The questions of benchmark `name` (BENCHMARKS) under `data_dir` (synthetic: generated from `seed`)."""
    report = report if report is not None else LoadReport()
    if name == "synthetic":
        return load_synthetic(seed)
    if data_dir is None:
        raise UserError(f"--benchmark {name} needs --data_dir (where its files are)")
    data_dir = Path(data_dir)
    if name == "mme":
        return load_mme(data_dir, report)
    if name == "pope":
        return load_pope(data_dir, Path(image_folder) if image_folder else data_dir / "val2014", report)
    default_images = {"textvqa": "train_images", "vsr": "images", "snli_ve": "flickr30k_images"}
    if name in default_images:
        images = Path(image_folder) if image_folder else data_dir / default_images[name]
        return {"textvqa": load_textvqa, "vsr": load_vsr, "snli_ve": load_snli_ve}[name](data_dir, images, report)
    if name in M2PT_TASKS:
        return load_task(data_dir, name, report)
    raise UserError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
