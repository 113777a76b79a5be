"""Training checkpoints on disk: atomic directories, the newest complete one, per-rank RNG state.

Layout under <output_dir>/checkpoints/:
  step-<k>/            a complete checkpoint (only ever created by a rename)
    state/             DeepSpeed's files: tuned tensors, optimizer partitions, LR scheduler, client state
    rng-rank<r>.pt     Python / NumPy / torch RNG state of rank r
    prompts.safetensors  the tuned tensors in the prompt-file format (readable without DeepSpeed)
  .tmp-step-<k>/       a checkpoint being written; ignored and replaced if a run died mid-save
A kill during a save leaves the previous step-<k> untouched: the new one appears only by os.replace.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_TAG = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-step-{step}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step}"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def newest_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def publish(output_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the finished temporary directory into place, then drop all but the newest `keep`. Rank 0 only."""
    tmp, final = temporary_dir(output_dir, step), final_dir(output_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Delete temporary directories of saves that never finished. Rank 0 only."""
    root = checkpoints_dir(output_dir)
    for partial in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)


def rng_state() -> dict:
    # CUDA: the current device's generator only. Each rank draws on its own GPU (the trainer sets it
    # from LOCAL_RANK), and every visible GPU's state would not restore on a machine with fewer GPUs.
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_rng(directory: Path, rank: int, state: dict | None = None) -> None:
    """Write `state` (default: the RNG state now, rng_state()) for this rank."""
    torch.save(rng_state() if state is None else state, directory / f"rng-rank{rank}.pt")


def load_rng(directory: Path, rank: int, world_size: int) -> None:
    path = directory / f"rng-rank{rank}.pt"
    if not path.is_file():
        saved = len(list(directory.glob("rng-rank*.pt")))
        raise ValueError(
            f"{directory} was written by {saved} process(es) but this run has {world_size}: "
            "resume with the same number of processes"
        )
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after `last_step`, so a resumed run's log reads as one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
