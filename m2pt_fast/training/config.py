"""The trainer's configuration: one dataclass, filled from defaults < a YAML recipe < the command line.

Option names follow LLaVA / transformers where one exists. Every check lives in
`TrainConfig.__post_init__` and its errors say the fix; `parse_args` turns a command line (and an
optional `--config recipe.yaml`) into a validated TrainConfig.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from m2pt_fast.data.conversation import TEMPLATES
from m2pt_fast.data.image import ASPECT_RATIOS
from m2pt_fast.errors import UserError
from m2pt_fast.method.methods import (
    DEFAULT_LEARNING_RATES,
    LORA_TARGETS,
    METHODS,
    PAPER_LEARNING_RATE,
    PROMPT_METHODS,
    LoraSettings,
    check_method,
    default_prompt_counts,
)
from m2pt_fast.models import llava_original
from m2pt_fast.models.loading import QWEN_FAMILIES, model_type
from m2pt_fast.training.reporting import parse_report_to

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
QUANTS = ("nf4", "bf16", "fp32")
BACKENDS = ("auto", "fused", "reference")
EMBEDDED_LEARNING_RATE = 5e-3


@dataclass
class TrainConfig:
    # --- model: a local LLaVA directory, or None for the embedded tiny LLaVA (random weights)
    model_name_or_path: str | None = None
    # LLaVA's own layout / the paper's assembly (m2pt_fast/models/llava_original.py), LLaVA's option names
    vision_tower: str | None = None
    pretrain_mm_mlp_adapter: str | None = None
    mm_vision_select_layer: int | None = None
    mm_vision_select_feature: str | None = None
    # --- data: a LLaVA conversation JSON, or None for the embedded synthetic set
    data_path: str | None = None
    image_folder: str | None = None
    num_synthetic_samples: int = 1024
    model_max_length: int = 2048
    version: str = "v1"  # LLaVA's conversation template: v1 (Vicuna v1), llava_v1, plain
    image_aspect_ratio: str | None = None  # crop or pad; None: the model config's (LLaVA's layout), else crop
    dataloader_num_workers: int = 2
    # --- method (m2pt_fast/method/methods.py): M²PT or one of the paper's baselines
    method: str = "m2pt"
    # --- prompts; None: the method's default (10 on each side it prompts, 0 on the others)
    num_vision_prompts: int | None = None
    num_text_prompts: int | None = None
    tune_projector: bool = True
    tune_lm_head: bool = False
    backend: str = "auto"
    quant: str | None = None  # None: bf16 on a GPU, fp32 on the CPU
    # --- LoRA (--method lora): LLaVA's own recipe by default
    lora_r: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_target_modules: str = ",".join(LORA_TARGETS)
    # --- optimisation
    output_dir: str = "outputs/m2pt"
    num_train_epochs: float = 3.0  # the paper's
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # None: 7e-4, the paper's (prompts and projector alike), for a real model; EMBEDDED_LEARNING_RATE
    # for the embedded tiny model, whose random frozen backbone needs larger steps
    learning_rate: float | None = None
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    estimate_memory: bool | None = None  # None: on with a GPU
    bf16: bool | None = None  # None: on when a GPU is used
    # --- outputs
    save_steps: int = 0  # 0: a checkpoint at the end of the run only
    save_total_limit: int = 2
    resume: bool = False
    # HF Trainer's: none, tensorboard, wandb, several, or all (m2pt_fast/training/reporting.py); metrics.jsonl always
    report_to: str = "none"
    run_name: str | None = None  # wandb's run name (default: wandb's own)
    # --- distributed
    ds_config: str | None = None  # None: ZeRO-0 with every value from these options
    local_rank: int = -1  # set by the deepspeed launcher

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {METHODS}, got {self.method!r}")
        vision, text = default_prompt_counts(self.method)
        self.num_vision_prompts = vision if self.num_vision_prompts is None else self.num_vision_prompts
        self.num_text_prompts = text if self.num_text_prompts is None else self.num_text_prompts
        positive = ("num_synthetic_samples", "model_max_length", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "save_total_limit", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_vision_prompts", "num_text_prompts", "dataloader_num_workers", "save_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        no_prompts = self.num_vision_prompts == 0 and self.num_text_prompts == 0
        if self.method in PROMPT_METHODS and no_prompts and not (self.tune_projector or self.tune_lm_head):
            raise UserError("nothing to train: give --num_vision_prompts/--num_text_prompts > 0 or --tune_projector")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max_steps must be a positive number of optimizer steps, or -1 to use "
                            f"--num_train_epochs; got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs must be > 0 (or give --max_steps), got {self.num_train_epochs}")
        if self.learning_rate is None:
            self.learning_rate = EMBEDDED_LEARNING_RATE if self.embedded_model else DEFAULT_LEARNING_RATES[self.method]
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio is a fraction of the run in [0, 1), got {self.warmup_ratio}")
        for name in ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm", "num_train_epochs",
                     "lora_alpha", "lora_dropout"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("--weight_decay and --max_grad_norm must be >= 0 (--max_grad_norm 0 turns clipping off)")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise UserError(f"--lr_scheduler_type must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.quant is not None and self.quant not in QUANTS:
            raise UserError(f"--quant must be one of {QUANTS}, got {self.quant!r}")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.image_folder and not self.data_path:
            raise UserError("--image_folder is given without --data_path: give the LLaVA JSON file too")
        if self.data_path and not Path(self.data_path).is_file():
            raise UserError(f"--data_path {self.data_path} is not a file: give the LLaVA conversation JSON")
        if self.image_folder and not Path(self.image_folder).is_dir():
            raise UserError(f"--image_folder {self.image_folder} is not a directory")
        if self.model_name_or_path and not Path(self.model_name_or_path).is_dir():
            raise UserError(
                f"--model_name_or_path {self.model_name_or_path} is not a local directory (nothing is downloaded): "
                "save the model and its tokenizer and image processor there first, or leave it out for the "
                "embedded tiny LLaVA"
            )
        for name in ("vision_tower", "pretrain_mm_mlp_adapter"):
            value = getattr(self, name)
            if value and not (Path(value).is_dir() if name == "vision_tower" else Path(value).is_file()):
                raise UserError(f"--{name} {value} is not a local {'directory' if name == 'vision_tower' else 'file'}"
                                " (nothing is downloaded)")
        if self.version not in TEMPLATES:
            raise UserError(f"--version must be one of {sorted(TEMPLATES)} (LLaVA's conversation templates), "
                            f"got {self.version!r}")
        if self.image_aspect_ratio not in (None, *ASPECT_RATIOS):
            raise UserError(f"--image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if self.mm_vision_select_feature not in (None, "patch", "cls_patch"):
            raise UserError("--mm_vision_select_feature must be patch or cls_patch, "
                            f"got {self.mm_vision_select_feature!r}")
        if self.model_name_or_path:
            if not (Path(self.model_name_or_path) / "config.json").is_file():
                raise UserError(f"--model_name_or_path {self.model_name_or_path} has no config.json (the model's "
                                "config): save the model, tokenizer and processor there with save_pretrained")
            if not (Path(self.processor_dir) / "preprocessor_config.json").is_file():
                raise UserError(f"{self.processor_dir} has no preprocessor_config.json (the image processor the "
                                "vision tower was trained with): save it there with save_pretrained"
                                + ("" if self.llava_source == "original" else
                                    " (or, for LLaVA's own layout, pass --vision_tower)"))
        if self.family != "llava":
            if not self.data_path:
                raise UserError(f"{self.model_name_or_path} is a {self.family} model: give --data_path, records in HF "
                                "\"messages\" form (JSON Lines; docs/training.md); the synthetic set is the embedded "
                                "LLaVA's")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UserError(f"--output_dir {self.output_dir} is a file, not a directory: give a directory")
        if self.quant == "nf4" and self.tune_lm_head:
            raise UserError("--tune_lm_head with --quant nf4: a 4-bit lm_head cannot be trained; use --quant bf16")
        if not 0.0 <= self.lora_dropout < 1.0 or not self.lora_alpha > 0:
            raise UserError(f"--lora_dropout must be in [0, 1) and --lora_alpha > 0, got {self.lora_dropout}, "
                             f"{self.lora_alpha}")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if not self.lora_targets or unknown:
            raise UserError(f"--lora_target_modules: {unknown or 'none given'}; the decoder's linear layers are "
                            f"{','.join(LORA_TARGETS)} (comma-separated)")
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"
        check_method(self.method, self.num_vision_prompts, self.num_text_prompts, quant=self.quant,
                     tune_lm_head=self.tune_lm_head)
        if self.ds_config and not Path(self.ds_config).is_file():
            raise UserError(f"--ds_config {self.ds_config} does not exist "
                            "(configs/ has zero0..zero3 and offload variants)")

    @property
    def embedded_model(self) -> bool:
        return self.model_name_or_path is None

    @property
    def family(self) -> str:
        """The model family: "llava" (the embedded model and every LLaVA layout), "qwen2_5_vl" or "qwen3_vl",
        as the model directory's config.json says."""
        if self.model_name_or_path is None or not (Path(self.model_name_or_path) / "config.json").is_file():
            return "llava"
        kind = model_type(self.model_name_or_path)
        return kind if kind in QWEN_FAMILIES else "llava"

    @property
    def llava_source(self) -> str | None:
        """"original" for LLaVA's own layout or the paper's assembly, "transformers" for a transformers
        LLaVA directory, None for the embedded model."""
        if self.model_name_or_path is None:
            return None

        path = Path(self.model_name_or_path) / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        return llava_original.checkpoint_layout(config, self.pretrain_mm_mlp_adapter)

    @property
    def processor_dir(self) -> str | None:
        """Where the image processor's config is: the model directory, or for LLaVA's own layout the
        vision tower's (--vision_tower, or a config's mm_vision_tower naming a local directory)."""
        if self.model_name_or_path is None:
            return None
        if (Path(self.model_name_or_path) / "preprocessor_config.json").is_file() or self.llava_source != "original":
            return self.model_name_or_path
        if self.vision_tower:
            return self.vision_tower

        tower = json.loads((Path(self.model_name_or_path) / "config.json").read_text()).get("mm_vision_tower")
        return tower if tower and Path(tower).is_dir() else self.model_name_or_path

    @property
    def aspect_ratio(self) -> str:
        """--image_aspect_ratio, else what a LLaVA-layout config says (LLaVA-1.5: pad), else crop."""
        if self.image_aspect_ratio:
            return self.image_aspect_ratio
        if self.model_name_or_path:
            path = Path(self.model_name_or_path) / "config.json"
            config = json.loads(path.read_text()) if path.is_file() else {}
            if config.get("image_aspect_ratio") == "pad":
                return "pad"
        return "crop"

    @property
    def reporters(self) -> tuple[str, ...]:
        return parse_report_to(self.report_to)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def convert(text: str):
        return None if text.strip().lower() in ("none", "null", "auto", "") else kind(text)
    return convert


_HELP = {
    "model_name_or_path": "a local LLaVA directory (transformers' layout or LLaVA's own), or a LLaMA directory "
                          "with --pretrain_mm_mlp_adapter; default: the embedded tiny LLaVA",
    "vision_tower": "a local CLIP directory: the tower of a LLaVA-layout model or of the paper's assembly",
    "pretrain_mm_mlp_adapter": "LLaVA's stage-1 projector (mm_projector.bin) to assemble a LLaVA from a LLaMA",
    "mm_vision_select_layer": "the vision layer whose features the LLM sees (default: the config's, else -2)",
    "mm_vision_select_feature": "patch (CLS dropped) or cls_patch (default: the config's, else patch)",
    "version": "LLaVA's conversation template: v1 (Vicuna v1, default), llava_v1, plain (captions)",
    "image_aspect_ratio": "crop (resize and centre crop) or pad (LLaVA-1.5: pad to a square with the mean "
                          "colour); default: the model config's, else crop",
    "data_path": "LLaVA conversation JSON; default: the embedded synthetic set",
    "image_folder": "where the JSON's image paths point (default: the JSON's directory)",
    "quant": "the frozen backbone's format (default: bf16 on a GPU, fp32 on the CPU)",
    "bf16": "bf16 compute (default: on with a GPU)",
    "estimate_memory": "log a step's peak GPU memory, counted at start for these options (m2pt_fast.plan; "
                       "default: on with a GPU)",
    "learning_rate": f"(default {PAPER_LEARNING_RATE}, the paper's, for the prompt methods; 2e-4 for lora and 2e-5 "
                     f"for full, LLaVA's; {EMBEDDED_LEARNING_RATE} for the embedded model)",
    "max_steps": "optimizer steps; -1 (default) runs --num_train_epochs",
    "save_steps": "checkpoint every this many steps (default 0: only at the end, for --resume to train further)",
    "resume": "continue from the newest complete checkpoint in --output_dir",
    "ds_config": "a DeepSpeed JSON (configs/); default: ZeRO-0",
    "local_rank": "set by the deepspeed launcher",
    "method": "m2pt (default), vpt, text_pt, lora or full (docs/training.md)",
    "num_vision_prompts": "prompts per vision layer (default: 10 for m2pt and vpt, else 0)",
    "num_text_prompts": "prompts per decoder layer (default: 10 for m2pt and text_pt, else 0)",
    "report_to": "where step metrics go besides metrics.jsonl: none (default), tensorboard, wandb, several "
                 "(space- or comma-separated) or all (the installed ones); wandb runs offline without credentials",
    "run_name": "the run's name in wandb",
    "lora_target_modules": "comma-separated decoder linear layers LoRA adapts (default: all seven)",
}


def build_parser() -> argparse.ArgumentParser:
    """One --option per TrainConfig field; defaults are suppressed so the given ones can be told apart."""
    parser = argparse.ArgumentParser(
        description="M²PT prompt tuning of a LLaVA model (with no model or data: the embedded tiny demo).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="a YAML recipe with any of the options below as keys")
    for f in fields(TrainConfig):
        default = f.default
        flag = f"--{f.name}"
        if f.type in ("bool", "bool | None"):
            # `--flag` alone means true; `--flag false` turns a default-on option off
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool,
                                help=_HELP.get(f.name, f"true or false (default {default})"))
        elif f.name == "report_to":  # HF Trainer's list: --report_to tensorboard wandb
            parser.add_argument(flag, nargs="+", help=_HELP[f.name])
        elif f.type in ("int", "float", "float | None", "int | None"):
            parser.add_argument(flag, type=int if f.type.startswith("int") else float,
                                help=_HELP.get(f.name, f"(default {default})"))
        else:
            choices = {"lr_scheduler_type": SCHEDULERS, "backend": BACKENDS, "quant": QUANTS,
                       "method": METHODS}.get(f.name)
            parser.add_argument(flag, type=str if choices else _optional(str), choices=choices,
                                help=_HELP.get(f.name, f"(default {default})"))
    return parser


def _check_yaml_values(path: str, values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe is a mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {unknown}; valid keys are the --options of train.py: "
                        f"{sorted(known)}")
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then `--config recipe.yaml`, then the other command-line options."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    recipe = given.pop("config", None)
    if recipe:
        if not Path(recipe).is_file():
            raise UserError(f"--config {recipe} does not exist")
        values.update(_check_yaml_values(recipe, yaml.safe_load(Path(recipe).read_text())))
    values.update(given)
    return TrainConfig(**values)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
