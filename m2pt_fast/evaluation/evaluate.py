"""Zero-shot evaluation, as LLaVA's scripts run it: `python -m m2pt_fast.evaluate`.

    python -m m2pt_fast.evaluate --run_dir outputs/m2pt --benchmark mme pope --data_dir data/eval
    python -m m2pt_fast.evaluate --model_name_or_path /models/llava-1.5-7b-hf --benchmark mnist ...

--run_dir is a training run's output directory: its run_config.json says how the base model was
built or loaded, and its output (prompt file, PEFT adapter, model directory) is what is evaluated;
--prompts names another output; with neither, the base model itself is evaluated. Answers come from
greedy decoding of the model's conversation template (--conv_mode), images preprocessed as it was
trained, questions batched with left padding (each layer's prompt K/V computed once per batch).
Written to --output_dir: predictions.jsonl (one line per question: question_id, prompt, text, target,
benchmark), scores.json (scores per benchmark, MMAvg, the model, the output, the commit and settings)
and scores.md (a table). Scoring: m2pt_fast.evaluation.scorers. LLaVA's own question files (--question_file)
are asked as written and answered, in addition, into answers/<stem>.jsonl in LLaVA's answer-file
format (question_id, prompt, text, answer_id, model_id, metadata), which its conversion and scoring
scripts read; they are scored here only where their records carry the answer.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from m2pt_fast.data import ConversationEncoder, ImagePreprocessor
from m2pt_fast.data.conversation import TEMPLATES
from m2pt_fast.errors import UserError
from m2pt_fast.evaluation.benchmark_files import (
    BENCHMARKS,
    LoadReport,
    Question,
    load_benchmark,
    load_llava_questions,
)
from m2pt_fast.evaluation.judge import Judge
from m2pt_fast.evaluation.scorers import choice_correct, mm_avg, mme_scores, pope_scores, vqa_accuracy
from m2pt_fast.method.methods import OUTPUT_NAMES, apply_method, load_output
from m2pt_fast.models.base_model import load_base
from m2pt_fast.training.config import TrainConfig

log = logging.getLogger(__name__)
MM_AVG_ALIASES = {"textvqa": "text_vqa", "vsr": "visual_spatial_reasoning", "snli_ve": "snli_ve_classification"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m2pt_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", help="a training run's output directory (its model and its trained output)")
    p.add_argument("--model_name_or_path", help="the base model, as the trainer takes it (default: the run's, "
                                                "else the embedded tiny LLaVA)")
    p.add_argument("--vision_tower")
    p.add_argument("--pretrain_mm_mlp_adapter")
    p.add_argument("--prompts", help="a trained output to evaluate: a prompt file, PEFT adapter or model directory")
    p.add_argument("--benchmark", nargs="+", choices=BENCHMARKS)
    p.add_argument("--question_file", nargs="+", metavar="FILE",
                   help="LLaVA question files (question_id, image, text), each a benchmark named by its stem; "
                        "answers also in LLaVA's answer-file format under <output_dir>/answers/")
    p.add_argument("--data_dir", help="where the benchmarks' files are (docs/evaluation.md)")
    p.add_argument("--compare", nargs="+", metavar="EVAL_DIR",
                   help="put earlier evaluations (their output directories) in one table and one radar plot, "
                        "written to --output_dir; nothing is evaluated")
    p.add_argument("--image_folder", help="POPE's COCO val2014 images (default: <data_dir>/val2014)")
    p.add_argument("--judge_model_name_or_path", help="a local causal LM (e.g. vicuna-13b-v1.5) that also rules on "
                   "every answer, the paper's protocol (m2pt_fast/evaluation/judge.py): judge_accuracy and "
                   "mm_avg_judge")
    p.add_argument("--output_dir", default="outputs/eval")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128, help="LLaVA-1.5's default")
    p.add_argument("--conv_mode", choices=sorted(TEMPLATES), help="default: the run's --version, else v1")
    p.add_argument("--limit", type=int, help="the first N questions of each benchmark (a quick look)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def _config(args) -> tuple[TrainConfig, dict]:
    """The TrainConfig that builds the base model (the run's, with the command line's overrides)."""
    run = {}
    values = {}
    if args.run_dir:
        path = Path(args.run_dir) / "run_config.json"
        if not path.is_file():
            raise UserError(f"--run_dir {args.run_dir} has no run_config.json: not a training run's output directory")
        run = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in run["config"].items() if k in known}
        values["output_dir"] = args.run_dir
        if values.get("data_path") and not Path(values["data_path"]).is_file():
            raise UserError(f"the run trained on --data_path {values['data_path']}, which is gone: the embedded "
                            "model's vocabulary (so its weights) is built from it")
    for name in ("model_name_or_path", "vision_tower", "pretrain_mm_mlp_adapter"):
        if getattr(args, name):
            values[name] = getattr(args, name)
    if args.conv_mode:
        values["version"] = args.conv_mode
    values["resume"] = False
    return TrainConfig(**values), run


def load_model(args, device: torch.device):
    """(model, tokenizer, encoder, preprocess, what was evaluated) for the arguments."""
    cfg, run = _config(args)
    quant = run.get("quant") or ("bf16" if device.type == "cuda" else "fp32")
    llava, tokenizer = load_base(cfg, device, device.type == "cuda", quant)
    output = Path(args.prompts) if args.prompts else (
        Path(args.run_dir) / OUTPUT_NAMES[run.get("method", "m2pt")] if args.run_dir else None)
    if output is not None:
        if not output.exists():
            raise UserError(f"{output} does not exist: the trained output to evaluate (--prompts or the run's)")
        model = load_output(llava, output, run.get("method"))
    else:
        model = apply_method(llava, "m2pt", num_vision_prompts=0, num_text_prompts=0)  # the base model as it is
    model.to(device).eval()
    if cfg.embedded_model:
        preprocess = ImagePreprocessor.clip_default(model.image_size, cfg.aspect_ratio)
    else:
        preprocess = ImagePreprocessor.from_model_dir(cfg.processor_dir, model.image_size, cfg.aspect_ratio)
    encoder = ConversationEncoder(tokenizer, model.image_token_id, model.image_seq_length, 1 << 30, version=cfg.version)
    return model, tokenizer, encoder, preprocess, {"model": cfg.model_name_or_path or "embedded", "output": str(output)
                                                   if output else None, "method": run.get("method"), "seed": cfg.seed}


@torch.no_grad()
def answer(model, tokenizer, encoder, preprocess, questions: list[Question], batch_size: int, max_new_tokens: int,
           device: torch.device, progress: bool = True) -> list[str]:
    """Greedy answers to `questions`, `batch_size` at a time (left-padded)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = []
    bar = tqdm(total=len(questions), desc="evaluate", unit="q", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        prompts = [encoder.encode_prompt(q.text) for q in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        pixels = []
        for q in batch:
            if isinstance(q.image, Image.Image):  # the synthetic benchmark's, drawn in memory
                pixels.append(preprocess(q.image))
                continue
            with Image.open(q.image) as image:
                pixels.append(preprocess(image))
        pixel_values = torch.stack(pixels).to(device, next(model.parameters()).dtype)
        out = model.generate(ids, pixel_values, max_new_tokens, attention_mask=mask, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        bar.update(len(batch))
        bar.set_postfix(q_s=f"{len(answers) / max(time.perf_counter() - started, 1e-9):.1f}", refresh=False)
    bar.close()
    return answers


def score(benchmark: str, questions: list[Question], predictions: list[str]) -> dict:
    """The benchmark's scores (m2pt_fast.evaluation.scorers), with "accuracy" as the headline where it has one."""
    if benchmark == "mme":
        rows = [{"category": q.extra["category"], "image": str(q.image), "question": q.text, "answer": q.target,
                 "prediction": p} for q, p in zip(questions, predictions)]
        return mme_scores(rows)
    if benchmark.startswith("pope_") and benchmark[5:] in ("adversarial", "popular", "random"):
        rows = [{"category": q.extra["category"], "label": q.target, "prediction": p}
                for q, p in zip(questions, predictions)]
        return pope_scores(rows)[benchmark[5:]]
    if any(q.target is None for q in questions):  # a question file without answers: answered, not scored
        return {"accuracy": None, "questions": len(questions)}
    right = [vqa_accuracy(p, q.target) if isinstance(q.target, list)
             else float(choice_correct(p, str(q.target), q.extra.get("options")))
             for q, p in zip(questions, predictions)]
    return {"accuracy": sum(right) / len(right) if right else 0.0, "questions": len(right)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _table(scores: dict) -> str:
    rows = ["| benchmark | score |", "|---|---|"]
    for part, value in scores.get("synthetic", {}).items():
        rows.append(f"| synthetic, {part.replace('_', ' ')} (accuracy) | {100 * value:.2f} |")
    for name, value in scores["benchmarks"].items():
        if name == "mme":
            rows.append(f"| MME perception / cognition | {value['perception']:.1f} / {value['cognition']:.1f} |")
        elif "f1" in value:
            rows.append(f"| {name} (accuracy / F1) | {100 * value['accuracy']:.2f} / {100 * value['f1']:.2f} |")
        elif value.get("accuracy") is None:
            rows.append(f"| {name} ({value['questions']} questions, unscored: answers/{name}.jsonl) | – |")
        elif "judge_accuracy" in value:
            rows.append(f"| {name} (accuracy / judge) | {100 * value['accuracy']:.2f} / "
                        f"{100 * value['judge_accuracy']:.2f} |")
        else:
            rows.append(f"| {name} (accuracy) | {100 * value['accuracy']:.2f} |")
    if scores.get("mm_avg") is not None:
        rows.append(f"| MMAvg | {100 * scores['mm_avg']:.2f} |")
    if scores.get("mm_avg_judge") is not None:
        rows.append(f"| MMAvg (judge) | {100 * scores['mm_avg_judge']:.2f} |")
    return "\n".join(rows) + "\n"


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): under torchrun or the deepspeed launcher (RANK, WORLD_SIZE set), a
    process group of its own (NCCL on GPUs, gloo on the CPU); else rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if world == 1:
        return 0, 1, device

    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device


def _gather(items: list, rank: int, world: int) -> list:
    """Every rank's `items` on every rank, in rank order (a collective)."""
    if world == 1:
        return [items]

    gathered: list = [None] * world
    dist.all_gather_object(gathered, items)
    return gathered


def evaluate(args) -> dict:
    """Answer and score every benchmark; under a launcher, question k goes to rank k % world and
    rank 0 writes the results, in question order."""
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be at least 1")
    judge = args.judge_model_name_or_path
    if judge and not (Path(judge) / "config.json").is_file():  # before any question is answered
        raise UserError(f"--judge_model_name_or_path {judge}: no config.json there (a local causal LM directory, "
                        "e.g. vicuna-13b-v1.5; nothing is downloaded)")
    rank, world, device = _distributed()
    try:
        return _evaluate(args, rank, world, device)
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def _evaluate(args, rank: int, world: int, device: torch.device) -> dict:
    model, tokenizer, encoder, preprocess, source = load_model(args, device)
    seed = source.pop("seed")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmarks, lines, answer_files, answered = {}, [], {}, {}
    sources = [(name, None) for name in args.benchmark or ()] + [(None, f) for f in args.question_file or ()]
    for name, question_file in sources:
        report = LoadReport()
        if question_file is not None:
            name = Path(question_file).name
            questions = load_llava_questions(Path(question_file), Path(args.image_folder) if args.image_folder
                                             else None, report)
        else:
            questions = load_benchmark(name, args.data_dir, args.image_folder, report, seed=seed)
        if report.skipped:
            log.warning("%s: skipped %d question(s): %s", name, sum(report.skipped.values()), dict(report.skipped))
        groups: dict[str, list[Question]] = {}
        for q in questions:
            groups.setdefault(q.benchmark, []).append(q)
        for bench, group in groups.items():
            group = group[:args.limit] if args.limit else group
            mine = answer(model, tokenizer, encoder, preprocess, group[rank::world], args.batch_size,
                          args.max_new_tokens, device, progress=rank == 0)
            shards = _gather(mine, rank, world)
            predictions = [shards[k % world][k // world] for k in range(len(group))]
            benchmarks[bench] = score(bench, group, predictions)
            answered[bench] = (group, predictions)
            if question_file is not None:
                answer_files[bench] = [llava_answer(q, p, source["model"], k) for k, (q, p) in
                                       enumerate(zip(group, predictions))]
            lines += [json.dumps({"question_id": q.question_id, "prompt": q.text, "text": p, "target": q.target,
                                  "benchmark": bench, **{k: v for k, v in q.extra.items() if k != "question"}})
                      for q, p in zip(group, predictions)]
    judged = args.judge_model_name_or_path and rank == 0
    if judged:
        del model  # the judge takes the device's memory next
        _judge(args.judge_model_name_or_path, device, answered, benchmarks, args.batch_size)
    synthetic = {part: benchmarks.pop(f"synthetic_{part}")["accuracy"] for part in ("seen", "held_out")
                 if f"synthetic_{part}" in benchmarks}
    scores = {**source, "commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                           "conv_mode": encoder.version, "data_dir": args.data_dir},
              "benchmarks": benchmarks, "mm_avg": _held_out_average(benchmarks, "accuracy"),
              **({"synthetic": synthetic} if synthetic else {})}
    if judged:
        scores["judge"] = args.judge_model_name_or_path
        scores["mm_avg_judge"] = _held_out_average(benchmarks, "judge_accuracy")
    scores["settings"]["processes"] = world
    if rank == 0:
        (out_dir / "predictions.jsonl").write_text("".join(line + "\n" for line in lines))
        (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        (out_dir / "scores.md").write_text(_table(scores))
        for bench, answers in answer_files.items():
            (out_dir / "answers").mkdir(exist_ok=True)
            (out_dir / "answers" / f"{bench}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return scores


def _held_out_average(benchmarks: dict, key: str) -> float | None:
    """MMAvg of the benchmarks' `key` (accuracy, or the judge's): MME apart, POPE's splits averaged
    first, the benchmarks' own files standing for the paper's tasks; None without any of them."""
    held_out = {name: value[key] for name, value in benchmarks.items()
                if name != "mme" and value.get(key) is not None}
    pope = [held_out.pop(f"pope_{s}") for s in ("adversarial", "popular", "random") if f"pope_{s}" in held_out]
    if pope:
        held_out["pope"] = sum(pope) / len(pope)
    for own_files, task in MM_AVG_ALIASES.items():  # a benchmark's own files count as the paper's task
        if own_files in held_out:
            held_out.setdefault(task, held_out.pop(own_files))
    try:
        return mm_avg(held_out)
    except ValueError:
        return None


def _judge(path: str, device: torch.device, answered: dict, benchmarks: dict, batch_size: int) -> None:
    """judge_accuracy for every answered benchmark with references (MME is scored by its own rule)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    judge = Judge(path, device)
    for bench, (group, predictions) in answered.items():
        if bench == "mme" or any(q.target is None for q in group):
            continue
        triples = [(q.extra.get("question", q.text), q.target, p) for q, p in zip(group, predictions)]
        verdicts = judge.rule(triples, batch_size)
        benchmarks[bench]["judge_accuracy"] = sum(verdicts) / len(verdicts) if verdicts else 0.0


def llava_answer(question: Question, prediction: str, model: str, index: int) -> dict:
    """One line of a LLaVA answer file (what its model_vqa_loader writes): the question's own id, the
    prompt, the answer text; answer_id is deterministic here (LLaVA draws a random one)."""
    return {"question_id": question.extra.get("llava_question_id", question.question_id), "prompt": question.text,
            "text": prediction, "answer_id": f"{question.benchmark}-{index}", "model_id": Path(str(model)).name,
            "metadata": {}}


def headline(name: str, value: dict) -> float | None:
    """A benchmark's one number, as the paper's table shows it: MME perception, else accuracy in percent
    (None for an unscored question file)."""
    if name == "mme":
        return value["perception"]
    return None if value.get("accuracy") is None else 100.0 * value["accuracy"]


def compare(eval_dirs: list[str], output_dir: str) -> str:
    """A Markdown table (benchmarks by evaluation) and, with matplotlib, a radar plot (each axis scaled
    to its best evaluation, as the paper's Figure 1), written to output_dir; returns the table."""
    runs = []
    for directory in eval_dirs:
        path = Path(directory) / "scores.json"
        if not path.is_file():
            raise UserError(f"--compare {directory} has no scores.json: not an evaluate output directory")
        runs.append((Path(directory).name, json.loads(path.read_text())))
    names = [b for b in dict.fromkeys(b for _, s in runs for b in s["benchmarks"])]
    rows = ["| benchmark | " + " | ".join(label for label, _ in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        cells = [f"{headline(name, s['benchmarks'][name]):.2f}"
                 if name in s["benchmarks"] and headline(name, s["benchmarks"][name]) is not None else "–"
                 for _, s in runs]
        rows.append(f"| {name}{' (perception)' if name == 'mme' else ''} | " + " | ".join(cells) + " |")
    rows.append("| MMAvg | " + " | ".join(f"{100 * s['mm_avg']:.2f}" if s.get("mm_avg") is not None else "–"
                                         for _, s in runs) + " |")
    table = "\n".join(rows) + "\n"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: compare.md only, no radar plot (pip install matplotlib)")
        return table

    names = [n for n in names if any(n in s["benchmarks"] and headline(n, s["benchmarks"][n]) is not None
                                     for _, s in runs)]  # unscored question files have no axis
    if len(names) >= 3:
        angles = [2 * math.pi * k / len(names) for k in range(len(names))]
        best = {n: max((headline(n, s["benchmarks"][n]) or 0 for _, s in runs if n in s["benchmarks"]), default=0)
                or 1 for n in names}
        figure = plt.figure(figsize=(6, 6))
        axes = figure.add_subplot(projection="polar")
        for label, s in runs:
            values = [(headline(n, s["benchmarks"][n]) or 0) / best[n] if n in s["benchmarks"] else 0 for n in names]
            axes.plot(angles + angles[:1], values + values[:1], label=label)
        axes.set_xticks(angles, names)
        axes.set_yticklabels([])
        axes.legend(loc="lower right", fontsize="small")
        figure.savefig(out / "compare.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
    return table


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.compare:
        try:
            print(compare(args.compare, args.output_dir), end="")
        except UserError as e:
            print(f"evaluate: error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.benchmark and not args.question_file:
        print("evaluate: error: --benchmark or --question_file is required (or --compare EVAL_DIR...)", file=sys.stderr)
        return 2
    try:
        scores = evaluate(args)
    except (UserError, FileNotFoundError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(_table(scores), end="")
    return 0
