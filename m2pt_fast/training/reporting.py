"""Where the trainer's per-step metrics go: metrics.jsonl always, plus TensorBoard and Weights & Biases.

`--report_to` takes HF Trainer's names and meaning: `none` (the default), `tensorboard`, `wandb`, several of
them (`--report_to tensorboard wandb`, or comma-separated), or `all` (each of the two whose package is
installed). Scalars are logged under HF Trainer's tags, `train/<name>`, with HF's names where it has one
(`loss`, `learning_rate`, `grad_norm`, `epoch`) and ours otherwise (`samples_per_s`, `tokens_per_s`,
`peak_mem_mb`, `skipped_records`).

TensorBoard writes event files to `$TENSORBOARD_LOGGING_DIR` (HF's variable) or else `<output_dir>/runs/`.
wandb follows its own variables (`WANDB_PROJECT`, default "m2pt-fast"; `WANDB_MODE`); with `WANDB_MODE`
unset and no wandb credentials on the machine it runs offline, writing under `<output_dir>/wandb/`, for
`wandb sync` later: a run never waits on a network it may not have.
"""
from __future__ import annotations

import importlib.util
import json
import netrc
import os
from pathlib import Path
from typing import Any

from m2pt_fast.errors import UserError

REPORTERS = ("tensorboard", "wandb")
# the record's names -> HF Trainer's log names, where it has one
HF_NAMES = {"lr": "learning_rate"}
NOT_SCALARS = ("step", "peak_mem_kind")


class ReportSetupError(UserError):
    """--report_to names an integration that cannot run here (the message says what to install)."""


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The integrations `--report_to` asks for, checked: () for none; `all` -> the installed ones."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [part for v in value for part in str(v).split(",")]
    names = [name.strip().lower() for name in items if name.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(name for name in REPORTERS if _installed(name))
    unknown = [name for name in names if name not in REPORTERS]
    if unknown or "none" in names or "all" in names:
        raise UserError(f"--report_to: {', '.join(unknown) or ' '.join(names)} is not one of none, all, "
                        f"{', '.join(REPORTERS)} (give several as --report_to tensorboard wandb)")
    return tuple(dict.fromkeys(names))


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_installed(names: tuple[str, ...]) -> None:
    """Refuse, before any weights are read, an integration whose package is missing."""
    missing = [name for name in names if not _installed(name)]
    if missing:
        raise ReportSetupError(f"--report_to {' '.join(missing)}: the package is not installed; "
                               f"pip install {' '.join(missing)}, or leave it out of --report_to")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as HF Trainer's tags: {"train/loss": ..., "train/learning_rate": ...}."""
    return {f"train/{HF_NAMES.get(key, key)}": float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MetricsReport:
    """Rank 0's writer of every step's record: metrics.jsonl, then each integration asked for."""

    def __init__(self, output_dir: Path, metrics_path: Path, report_to: tuple[str, ...], run_name: str | None,
                 config: dict):
        self.metrics_path = metrics_path
        self.locations: list[str] = []
        self._tensorboard = self._wandb_run = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or str(Path(output_dir) / "runs")
            self._tensorboard = SummaryWriter(log_dir=log_dir)
            self._tensorboard.add_text("run_config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")
            self.locations.append(f"tensorboard: {log_dir}")
        if "wandb" in report_to:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
            self._wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "m2pt-fast"), name=run_name,
                                         config=config, dir=str(output_dir), mode=mode)
            where = f"wandb ({mode}): {self._wandb_run.dir}"
            if mode == "offline":
                where += f"; upload later with: wandb sync {Path(self._wandb_run.dir).parent}"
            self.locations.append(where)

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars(record)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, record["step"])
        if self._wandb_run is not None:
            self._wandb_run.log({**values, "train/global_step": record["step"]}, step=record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def wandb_credentials() -> bool:
    """Whether this machine holds a wandb API key (WANDB_API_KEY, or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
