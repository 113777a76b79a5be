"""DeepSpeed configuration: read the user's JSON, fill its "auto" values from the trainer's options,
and refuse combinations that would silently train something else than asked.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from m2pt_fast.errors import UserError
from m2pt_fast.training.config import TrainConfig

# Used when no --ds_config is given: plain data parallel, every value from the command line.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
}


def load_ds_config(path: str | None) -> dict[str, Any]:
    """The DeepSpeed config at `path` (None: DEFAULT_DS_CONFIG), checked for what the trainer reads."""
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--ds_config {path} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise UserError(f"--ds_config {path} holds a JSON {type(ds).__name__}; a DeepSpeed config is an object "
                        "({\"zero_optimization\": {\"stage\": 2}, ...}, as in configs/)")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"--ds_config {path}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise UserError(f"--ds_config {path}: zero_optimization.stage must be the number 0, 1, 2 or 3, got {stage!r}")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def _fill(section: dict[str, Any], key: str, value: Any, option: str, where: str) -> None:
    """Set section[key] to `value` if "auto" or absent; refuse a different concrete value."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise UserError(
            f"{where} sets {key}={current!r} but {option} gives {value!r}: set it to \"auto\" in the DeepSpeed "
            f"config (the command line then decides) or make the two agree"
        )


def resolve_ds_config(ds: dict[str, Any], config: TrainConfig, world_size: int, bf16: bool,
                      where: str = "the DeepSpeed config") -> dict[str, Any]:
    """A copy of `ds` with every "auto" filled and the trainer's invariants checked."""
    ds = copy.deepcopy(ds)
    for section, why in (("optimizer", "AdamW over the tuned parameters only"),
                         ("scheduler", f"the --lr_scheduler_type schedule ({config.lr_scheduler_type})")):
        if section in ds:
            raise UserError(
                f"{where} has an \"{section}\" section: remove it. The trainer builds {why} itself; a DeepSpeed "
                f"{section} would silently replace it (M²PT's released code lost its cosine schedule this way)"
            )
    if ds.get("fp16", {}).get("enabled") is True:
        raise UserError(f"{where} enables fp16: M²PT trains in bf16 (GPU) or fp32; "
                        "set \"bf16\": {\"enabled\": \"auto\"} instead")
    ds.setdefault("fp16", {})["enabled"] = False

    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size", where)
    _fill(ds, "gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps", where)
    _fill(ds, "train_batch_size", micro * accumulation * world_size,
          f"--per_device_train_batch_size x --gradient_accumulation_steps x {world_size} processes", where)
    _fill(ds, "gradient_clipping", float(config.max_grad_norm), "--max_grad_norm", where)
    _fill(ds.setdefault("bf16", {}), "enabled", bf16, "--bf16", where)

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if stage == 3 and config.quant == "nf4":
        raise UserError(
            f"{where} uses ZeRO-3 with --quant nf4: 4-bit weights cannot be partitioned (broken upstream in "
            "bitsandbytes + DeepSpeed). Use a ZeRO 0-2 config (configs/zero2.json) with nf4, "
            "or --quant bf16 with ZeRO-3"
        )
    # Bucket sizes and thresholds left "auto" take DeepSpeed's own defaults.
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]
    if offloads_optimizer(ds):
        # On a machine without a GPU the trainer's torch AdamW already runs on the CPU.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise UserError(f"{where}: no option fills the \"auto\" value(s) of {leftover}; give concrete values")
    return ds


def _walk(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
