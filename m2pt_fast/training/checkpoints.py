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

from m2pt_fast.errors import UserError

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


RUN_STATE = "run_state.json"  # beside DeepSpeed's state: where the run stood, readable without DeepSpeed


def write_run_state(directory: Path, step: int, total_steps: int) -> None:
    (directory / RUN_STATE).write_text(json.dumps({"step": step, "total_steps": total_steps}))


def finished_run(output_dir: str | Path) -> bool:
    """True when the newest checkpoint is the end of its run (step = its total steps); False for an
    unfinished run and for checkpoints of releases that wrote no run state."""
    found = newest_checkpoint(output_dir)
    if found is None or not (found[1] / RUN_STATE).is_file():
        return False
    try:
        state = json.loads((found[1] / RUN_STATE).read_text())
        return int(state["step"]) >= int(state["total_steps"])
    except (ValueError, KeyError, TypeError, OSError):
        return False


class CheckpointMismatch(UserError):
    """A sound checkpoint written by another number of processes: no older one would fit either."""


def _load(path: Path):
    """(object, None) when `path` reads back in full, else (None, what is wrong with it)."""
    if path.stat().st_size == 0:
        return None, f"{path.name} is empty"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, None
        return torch.load(path, map_location="cpu", weights_only=False), None
    except Exception as exc:  # truncation shows as EOFError, RuntimeError, OSError, SafetensorError...
        return None, f"{path.name} cannot be read ({type(exc).__name__}: {str(exc)[:120]})"


def checkpoint_problems(path: Path, world_size: int, output: str | None = "prompts.safetensors") -> list[str]:
    """What keeps checkpoint directory `path` from being resumed ([] if nothing): every file is read
    back in full (a checkpoint holds the tuned tensors and their optimizer state only, so this costs
    little next to loading the model). `output`: the method's output it holds besides (a prompt file,
    a PEFT adapter directory; None: none). Raises CheckpointMismatch for one written by another number
    of processes."""
    problems = []
    state = path / STATE_TAG
    files = sorted(state.glob("*.pt")) if state.is_dir() else []
    if not state.is_dir():
        problems.append(f"{STATE_TAG}/ (DeepSpeed's files) is missing")
    elif not any(f.name.startswith("mp_rank_") for f in files):
        problems.append(f"{STATE_TAG}/ holds no model states (mp_rank_*_model_states.pt)")
    for f in files:
        loaded, problem = _load(f)
        if problem:
            problems.append(f"{STATE_TAG}/{problem}")
        elif f.name.startswith("mp_rank_00_"):
            saved = (loaded.get("signature") or {}).get("world_size") if isinstance(loaded, dict) else None
            if saved is not None and saved != world_size:
                raise CheckpointMismatch(f"{path} was written by {saved} process(es) but this run has {world_size}: "
                                         "resume with the same number of processes")
    for rank in range(world_size):
        rng = path / f"rng-rank{rank}.pt"
        if not rng.is_file():
            problems.append(f"{rng.name} (rank {rank}'s RNG state) is missing")
        elif problem := _load(rng)[1]:
            problems.append(problem)
    if output is not None:
        # an adapter directory's tensors are its adapter_model.safetensors
        tensors = path / output / "adapter_model.safetensors" if not output.endswith(".safetensors") else path / output
        if not tensors.is_file():
            problems.append(f"{tensors.relative_to(path)} is missing")
        elif problem := _load(tensors)[1]:
            problems.append(problem)
    return problems


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
        raise UserError(
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


LOCK_NAME = ".m2pt-run.lock"


class OutputDirLock:
    """`<output_dir>/.m2pt-run.lock`: one live run per output directory.

    The file holds the holder's PID and host. A lock whose process is gone (a run that was killed) is
    taken over; one held by a live process on this host is refused with its PID. Taken by one process
    of a run (rank 0), released when the run ends.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead run's lock was taken over. Raises ValueError when a
        live run holds it."""
        import socket

        note = None
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and holder.get("host") == me["host"] and _alive(holder.get("pid")):
                    raise UserError(f"{self.path.parent} is in use by a live run (PID {holder['pid']}); "
                                    "wait for it to end or stop it, or give another --output_dir") from None
                if holder and holder.get("host") != me["host"]:
                    raise UserError(f"{self.path.parent} is locked by a run on host {holder.get('host')} "
                                    f"(PID {holder.get('pid')}); if that run is gone, delete {self.path}") from None
                note = f"took over the lock of a run that is gone ({holder or 'unreadable lock file'})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return note
        raise UserError(f"could not take the lock {self.path}: another run is starting in the same directory")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
