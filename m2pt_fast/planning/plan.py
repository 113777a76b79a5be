"""Will a training run fit on a GPU? Peak memory by micro-batch, counted at full size on a CPU.

    python -m m2pt_fast.plan --shape llava-1.5-7b --gpu_memory 24GiB
    python -m m2pt_fast.plan --model_name_or_path DIR --gpu_memory 24GiB --model_max_length 2048 --quant nf4 \\
        --method m2pt --per_device_train_batch_size 8 [--json]
    python -m m2pt_fast.plan --model_name_or_path DIR --data_path data.json --image_folder images --gpu_memory 24GiB

The model is built on the meta device (a named shape, or a transformers LLaVA directory's config.json:
no weight is read) and trained there under m2pt_fast.planning.memory's count (one step after the optimizer's
states exist: a later step's peak), with checkpointing off and on, at each micro-batch of the table;
the largest that fits is found between two counted ones, exactly (m2pt_fast.planning.memory.Extrapolation),
or by further counts. A micro-batch fits when

    counted peak × (1 + fragmentation) + margin ≤ GPU memory,

margin (default 1 GiB) for what PyTorch's allocator does not hold (the CUDA context, cuBLAS
workspaces) and fragmentation (default 10%) for the allocator's cached but unused blocks; both are
options. DeepSpeed's bf16 training also keeps an fp32 master, fp32 gradients and fp32 Adam states of
every trained parameter where the count has the parameter's own dtype: 12 bytes per trained
parameter are added for it (docs/memory.md). Every sample is taken at --model_max_length tokens with
every text token labelled, the most a batch can hold; with --data_path, as long as the data's longest
sample and with as many labelled tokens as the most of any (encoded as the trainer encodes them:
the model directory's tokenizer, --version's template, truncation at --model_max_length).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaConfig

from m2pt_fast.data import ConversationEncoder, load_llava_records, longest_sample
from m2pt_fast.errors import MissingInput, UserError
from m2pt_fast.labels import IGNORE_INDEX
from m2pt_fast.method.methods import METHODS, apply_method, default_prompt_counts, trainable_parameters
from m2pt_fast.models import llava_original
from m2pt_fast.models.llava import NAMED_CONFIGS, build_llava, llava_config
from m2pt_fast.models.quantize import quantize_model
from m2pt_fast.planning import memory

GIB = 2**30
# fp32 master 4 + fp32 gradient 4 + fp32 Adam states 8, less the bf16 states the count has (4)
DEEPSPEED_BF16_BYTES_PER_TRAINED_PARAMETER = 12
DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80G', '1.5TiB', '1073741824' -> bytes (G/GiB binary, GB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match or (match.group(2) == "" and match.group(3) != ""):
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB, 40G)")
    value, prefix, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).upper()
    power = "KMGT".find(prefix) + 1 if prefix else 0
    base = 1000 if suffix == "B" and prefix else 1024
    return int(value * base**power)


@dataclasses.dataclass
class PlanRequest:
    shape: str | None = "llava-1.5-7b"
    model_name_or_path: str | None = None
    gpu_memory: int = 24 * GIB
    model_max_length: int = 2048
    answer_tokens: int | None = None  # None: every text token
    quant: str = "nf4"
    method: str = "m2pt"
    num_vision_prompts: int | None = None
    num_text_prompts: int | None = None
    backend: str = "fused"
    per_device_train_batch_size: int = 8
    micro_batches: tuple[int, ...] = DEFAULT_MICRO_BATCHES
    margin: int = GIB
    fragmentation: float = 0.10
    deepspeed: bool = True
    data_path: str | None = None  # plan for this LLaVA JSON's longest sample (needs the model's tokenizer)
    image_folder: str | None = None
    version: str = "v1"


def _llava_config(request: PlanRequest):
    if request.model_name_or_path is None:
        return llava_config(request.shape), request.shape
    path = Path(request.model_name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingInput(f"{str(path)!r} has no config.json (a transformers LLaVA directory; "
                           "nothing is downloaded)")
    config = json.loads(config_file.read_text())

    if llava_original.checkpoint_layout(config) == "original":
        raise UserError(f"{config_file}: LLaVA's own layout (or a LLaMA to assemble into one); pick the --shape "
                        "it has, or write it as an NF4 directory (python -m m2pt_fast.to_nf4) and plan that")
    if config.get("model_type") != "llava":
        raise UserError(f"{config_file}: model_type {config.get('model_type')!r}; the planner reads transformers' "
                        "LLaVA configs (model_type 'llava'); for LLaVA's own layout pick the --shape it has")

    return LlavaConfig.from_dict({k: v for k, v in config.items() if k != "quantization_config"}), path.name


def meta_model(config, *, quant: str, method: str, num_vision_prompts: int, num_text_prompts: int,
               backend: str = "fused", dtype: torch.dtype = torch.bfloat16, **method_options):
    """A LLaVA of `config` on meta, its backbone in `quant` (nf4 or dense), made trainable by
    `method` as the trainer makes it (methods.apply_method; `method_options` go there too)."""
    llava = build_llava(copy.deepcopy(config), device="meta", dtype=dtype)
    if quant == "nf4":
        quantize_model(llava)
    elif quant not in ("bf16", "fp32"):
        raise UserError(f"--quant must be nf4 or bf16, got {quant!r}")
    model = apply_method(llava, method, num_vision_prompts=num_vision_prompts, num_text_prompts=num_text_prompts,
                         backend=backend, **method_options)
    model.train()
    return model


def build_on_meta(request: PlanRequest):
    """The model of `request`, trainable as the trainer makes it, on meta; and a description."""
    config, name = _llava_config(request)
    vision, text = default_prompt_counts(request.method)
    vision = vision if request.num_vision_prompts is None else request.num_vision_prompts
    text = text if request.num_text_prompts is None else request.num_text_prompts
    model = meta_model(config, quant=request.quant, method=request.method, num_vision_prompts=vision,
                       num_text_prompts=text, backend=request.backend)
    return model, name, (vision, text)


def _batch_maker(model, model_max_length: int, answer_tokens: int | None, micro_batch: int):
    image = model.image_seq_length
    text = model_max_length - 1 - image
    if text < 1:
        raise UserError(f"--model_max_length {model_max_length} leaves no text after BOS and the image's "
                        f"{image} tokens")
    answer = text if answer_tokens is None else min(answer_tokens, text)
    vocab = model.llava.config.text_config.vocab_size

    def make():
        ids = torch.cat([torch.ones(micro_batch, 1, dtype=torch.long),
                         torch.full((micro_batch, image), model.image_token_id),
                         torch.randint(2, min(vocab, model.image_token_id), (micro_batch, text),
                                       generator=torch.Generator().manual_seed(0))], dim=1)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -answer:] = ids[:, -answer:]
        meta = torch.device("meta")
        dtype = model.llava.lm_head.weight.dtype  # never quantized: the dense dtype
        pixels = torch.empty(micro_batch, 3, model.image_size, model.image_size, dtype=dtype, device=meta)
        return dict(input_ids=ids.to(meta), pixel_values=pixels, attention_mask=torch.ones_like(ids).to(meta),
                    labels=labels.to(meta))

    return make


def _count(model, request: PlanRequest, micro_batch: int, *, checkpointing: bool) -> memory.MemoryReport:
    """One step after the optimizer's states exist (memory.warm_optimizer): a later step's peak."""
    return count_step(model, micro_batch, checkpointing=checkpointing, model_max_length=request.model_max_length,
                      answer_tokens=request.answer_tokens)


def count_step(model, micro_batch: int, *, checkpointing: bool, model_max_length: int,
               answer_tokens: int | None = None) -> memory.MemoryReport:
    """The counted peak of a training step of `model` (on meta) at `micro_batch` samples of
    `model_max_length` tokens, the last `answer_tokens` of each labelled (default: every text token),
    once the optimizer's states exist (memory.warm_optimizer)."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    memory.warm_optimizer(optimizer)
    batch = _batch_maker(model, model_max_length, answer_tokens, micro_batch)
    return memory.count_steps(model, optimizer, batch, steps=1, timeline=True)


def data_lengths(request: PlanRequest, model, progress: bool = False) -> dict:
    """The longest sample of request.data_path as the trainer encodes it (its tokenizer, template and
    --model_max_length truncation; records it would skip are skipped): tokens, labelled tokens, records."""
    if request.model_name_or_path is None:
        raise UserError("--data_path needs --model_name_or_path: the model directory's tokenizer measures the "
                        "samples")

    try:
        tokenizer = AutoTokenizer.from_pretrained(request.model_name_or_path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"{request.model_name_or_path} has no tokenizer to measure --data_path with "
                        f"({error})") from error
    encoder = ConversationEncoder(tokenizer, model.image_token_id, model.image_seq_length, request.model_max_length,
                                  version=request.version)
    records, _ = load_llava_records(request.data_path, request.image_folder, encoder, progress=progress)
    tokens, labelled = longest_sample(records)
    return {"path": str(request.data_path), "records": len(records), "longest_tokens": tokens,
            "most_labelled": labelled}


def plan(request: PlanRequest, progress=None) -> dict:
    """Peak memory by micro-batch with checkpointing off and on, what fits, and what to pass."""
    start = time.perf_counter()
    model, name, (vision, text) = build_on_meta(request)
    data = None
    if request.data_path is not None:
        # every sample of a step as long as the longest, as many labelled as the most: a bound on any batch
        data = data_lengths(request, model, progress=progress is not None)
        request = dataclasses.replace(request, model_max_length=data["longest_tokens"],
                                      answer_tokens=data["most_labelled"])
    trained = sum(p.numel() for p in trainable_parameters(model))
    extra = DEEPSPEED_BF16_BYTES_PER_TRAINED_PARAMETER * trained if request.deepspeed else 0
    usable = (request.gpu_memory - request.margin) / (1 + request.fragmentation)
    settings, counts = {}, {}
    for checkpointing in (False, True):
        key = "on" if checkpointing else "off"
        counts[key] = memory.PeaksByMicroBatch(functools.partial(_count, model, request, checkpointing=checkpointing),
                                               progress=progress, label=f"checkpointing {key}")
        peaks = {b: counts[key][b].peak_bytes + extra for b in request.micro_batches}
        settings[key] = {
            "peak_bytes": peaks,
            "fits": {b: peak <= usable for b, peak in peaks.items()},
            "max_micro_batch": counts[key].largest_within(usable - extra),
        }
    target = request.per_device_train_batch_size
    off, on = settings["off"]["max_micro_batch"], settings["on"]["max_micro_batch"]
    if off >= target:
        advice = dict(per_device_train_batch_size=target, gradient_checkpointing=False, gradient_accumulation_steps=1)
    elif on >= target:
        advice = dict(per_device_train_batch_size=target, gradient_checkpointing=True, gradient_accumulation_steps=1)
    elif on >= 1:
        advice = dict(per_device_train_batch_size=on, gradient_checkpointing=True,
                      gradient_accumulation_steps=math.ceil(target / on))
    else:
        advice = None
    chosen = advice or dict(per_device_train_batch_size=1, gradient_checkpointing=True)
    detail = counts["on" if chosen["gradient_checkpointing"] else "off"][chosen["per_device_train_batch_size"]]
    breakdown = dict(detail.breakdown)
    if extra:
        breakdown["DeepSpeed bf16 state (estimate)"] = extra
    return {
        "model": name, "method": request.method, "backend": model.backend, "quant": request.quant,
        "prompts": {"vision": vision, "text": text}, "trained_parameters": trained,
        "model_max_length": request.model_max_length, "answer_tokens": request.answer_tokens, "data": data,
        "image_tokens": model.image_seq_length,
        "gpu_memory_bytes": request.gpu_memory, "margin_bytes": request.margin,
        "fragmentation": request.fragmentation, "usable_peak_bytes": int(usable),
        "checkpointing": settings, "advice": advice,
        "breakdown": {"micro_batch": chosen["per_device_train_batch_size"],
                      "gradient_checkpointing": chosen["gradient_checkpointing"],
                      "peak_bytes": detail.peak_bytes + extra, "peak_phase": detail.peak_phase,
                      "bytes": breakdown},
        "counts": {key: sorted(c.reports) for key, c in counts.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def estimate_run(config, *, micro_batch: int, checkpointing: bool, model_max_length: int,
                 answer_tokens: int | None = None, deepspeed: bool = True,
                 **model_options) -> tuple[memory.MemoryReport, int]:
    """The counted peak of one training step of a run (the trainer's own settings; model_options as
    meta_model takes them) and the DeepSpeed bf16 state added for its trained parameters."""
    model = meta_model(config, **model_options)
    trained = sum(p.numel() for p in trainable_parameters(model))
    report = count_step(model, micro_batch, checkpointing=checkpointing, model_max_length=model_max_length,
                        answer_tokens=answer_tokens)
    return report, DEEPSPEED_BF16_BYTES_PER_TRAINED_PARAMETER * trained if deepspeed else 0


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def size(n: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB (a tiny model's step is not '0.00 GiB')."""
    return _gib(n) if n >= GIB else f"{n / 2**20:.2f} MiB"


def render(result: dict) -> str:
    off, on = result["checkpointing"]["off"], result["checkpointing"]["on"]
    answers = result.get("answer_tokens")
    labelled = "every text token labelled" if answers is None else f"the last {answers} labelled"
    data = ""
    if result.get("data"):
        data = f" (the longest of {result['data']['records']:,} records in {result['data']['path']})"
    lines = [
        f"{result['model']} · {result['method']} ({result['backend']}) · {result['quant']} backbone · "
        f"prompts {result['prompts']['vision']}+{result['prompts']['text']} · "
        f"{result['trained_parameters']:,} trained parameters",
        f"{result['model_max_length']} tokens per sample ({result['image_tokens']} image), {labelled}{data}; "
        f"GPU {_gib(result['gpu_memory_bytes'])}: fits when peak × {1 + result['fragmentation']:.2f} + "
        f"{_gib(result['margin_bytes'])} ≤ it (peak ≤ {_gib(result['usable_peak_bytes'])})",
        "",
        "| micro-batch | checkpointing off | checkpointing on |",
        "| ---: | ---: | ---: |",
    ]
    for b in off["peak_bytes"]:
        cells = [f"{_gib(s['peak_bytes'][b])} {'fits' if s['fits'][b] else 'no'}" for s in (off, on)]
        lines.append(f"| {b} | {cells[0]} | {cells[1]} |")
    lines.append(f"| largest that fits | {off['max_micro_batch']} | {on['max_micro_batch']} |")
    lines.append("")
    advice = result["advice"]
    if advice is None:
        lines.append("does not fit: even micro-batch 1 with checkpointing needs more (see the breakdown)")
    else:
        flags = f"--per_device_train_batch_size {advice['per_device_train_batch_size']}"
        if advice["gradient_checkpointing"]:
            flags += " --gradient_checkpointing"
        if advice["gradient_accumulation_steps"] > 1:
            flags += f" --gradient_accumulation_steps {advice['gradient_accumulation_steps']}"
        lines.append(f"use: {flags}")
    detail = result["breakdown"]
    lines.append(f"peak at micro-batch {detail['micro_batch']}, checkpointing "
                 f"{'on' if detail['gradient_checkpointing'] else 'off'}: {_gib(detail['peak_bytes'])} "
                 f"(in {detail['peak_phase']})")
    for category, n in sorted(detail["bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {category:<32} {_gib(n):>11}")
    lines.append(f"(counted in {result['seconds']} s)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2pt_fast.plan", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=sorted(NAMED_CONFIGS), help="a named model shape (default llava-1.5-7b)")
    source.add_argument("--model_name_or_path", help="a local transformers LLaVA directory (its config.json only)")
    parser.add_argument("--gpu_memory", type=parse_bytes, default=24 * GIB, help="e.g. 24GiB (default), 80GB")
    parser.add_argument("--model_max_length", type=int, default=2048, help="tokens per sample (default 2048)")
    parser.add_argument("--answer_tokens", type=int, help="labelled tokens per sample (default: every text token)")
    parser.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument("--method", choices=METHODS, default="m2pt")
    parser.add_argument("--num_vision_prompts", type=int)
    parser.add_argument("--num_text_prompts", type=int)
    parser.add_argument("--backend", choices=("fused", "reference"), default="fused")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8,
                        help="the micro-batch you want (default 8)")
    parser.add_argument("--micro_batches", default=",".join(map(str, DEFAULT_MICRO_BATCHES)),
                        help="the table's rows (default %(default)s)")
    parser.add_argument("--margin", type=parse_bytes, default=GIB, help="outside the allocator (default 1GiB)")
    parser.add_argument("--fragmentation", type=float, default=0.10, help="allocator slack (default 0.10)")
    parser.add_argument("--no_deepspeed", action="store_true", help="plain AdamW: no fp32 master state added")
    parser.add_argument("--data_path", help="a LLaVA JSON: plan for its longest sample, as the trainer encodes it "
                        "(with --model_name_or_path's tokenizer), instead of --model_max_length tokens")
    parser.add_argument("--image_folder", help="where --data_path's images are (default: beside it)")
    parser.add_argument("--version", default="v1", help="the conversation template, as the trainer's (default v1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def request_from_args(argv=None) -> tuple[PlanRequest, bool]:
    """(the request, whether --json was given) from the command line."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        micro_batches = tuple(int(b) for b in args.micro_batches.split(",") if b.strip())
    except ValueError:
        parser.error(f"--micro_batches takes comma-separated integers, got {args.micro_batches!r}")
    for flag, value in (("--model_max_length", args.model_max_length),
                        ("--per_device_train_batch_size", args.per_device_train_batch_size)):
        if value < 1:
            parser.error(f"{flag} must be positive, got {value}")
    if not micro_batches or min(micro_batches) < 1:
        parser.error("--micro_batches must list positive integers")
    if args.fragmentation < 0:
        parser.error("--fragmentation must be >= 0")
    if args.margin >= args.gpu_memory:
        parser.error(f"--margin {args.margin} leaves nothing of --gpu_memory {args.gpu_memory}")
    return PlanRequest(
        shape=args.shape or (None if args.model_name_or_path else "llava-1.5-7b"),
        model_name_or_path=args.model_name_or_path, gpu_memory=args.gpu_memory,
        model_max_length=args.model_max_length, answer_tokens=args.answer_tokens, quant=args.quant,
        method=args.method, num_vision_prompts=args.num_vision_prompts, num_text_prompts=args.num_text_prompts,
        backend=args.backend, per_device_train_batch_size=args.per_device_train_batch_size,
        micro_batches=micro_batches, margin=args.margin, fragmentation=args.fragmentation,
        deepspeed=not args.no_deepspeed, data_path=args.data_path, image_folder=args.image_folder,
        version=args.version,
    ), args.json


def main(argv=None) -> int:
    request, as_json = request_from_args(argv)
    try:
        result = plan(request, progress=lambda text: print(f"[plan] {text}", file=sys.stderr, flush=True))
    except (FileNotFoundError, UserError) as error:
        print(f"python -m m2pt_fast.plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if as_json else render(result))
    return 0
