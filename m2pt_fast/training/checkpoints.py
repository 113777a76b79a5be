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

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from m2pt_fast.errors import UserError

log = logging.getLogger(__name__)

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


# What a failed write raises: OSError; RuntimeError from torch.save (a full disk, too); SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class WriteFailed(Exception):
    """A checkpoint or the run's output could not be written (the message says what is kept, and where)."""


def remove_path(path: Path) -> None:
    """Delete a file or a directory, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` (a file, or a directory whose old copy goes first)."""
    if tmp.is_dir() and path.exists():
        remove_path(path)
    os.replace(tmp, path)


class Checkpointer:
    """The run's checkpoints under <output_dir>/checkpoints: where a run starts, writing a step whole or
    not at all, keeping the newest `keep`, and saying what is kept when a write fails.

    output_name: the method's output each checkpoint holds besides DeepSpeed's state (None for full
    fine-tuning, whose weights DeepSpeed's state holds already). first_bytes: about what a checkpoint
    takes before any exists to measure. Every rank makes one; `start` and `save` are collectives.
    """

    def __init__(self, output_dir: Path, rank: int, world_size: int, device: torch.device,
                 output_name: str | None, keep: int, first_bytes: int):
        self.output_dir, self.rank, self.world_size, self.device = Path(output_dir), rank, world_size, device
        self.output_name, self.keep, self.first_bytes = output_name, keep, first_bytes

    def newest(self) -> tuple[int, Path] | None:
        return newest_checkpoint(self.output_dir)

    def output_at(self, step: int) -> Path | None:
        """The method's output in checkpoint step-<step> (None where checkpoints hold none)."""
        return final_dir(self.output_dir, step) / self.output_name if self.output_name else None

    # ---------------------------------------------------------------------------------- finding
    def start(self, resume: bool) -> tuple[int, Path] | None:
        """Where this run starts: with `resume`, the newest intact checkpoint (step, path); without, None,
        after a finished run's checkpoints are cleared (an unfinished run's are refused). Saves that never
        finished are removed."""
        found = self.newest()
        start = None
        if resume:
            if found is None:
                raise UserError(f"--resume: no complete checkpoint under {checkpoints_dir(self.output_dir)}; "
                                "leave out --resume to start a new run")
            start = self._intact()
        elif found is not None and finished_run(self.output_dir):
            # a finished run's outputs give way to a new run, as a directory without checkpoints always did
            if self.rank == 0:
                log.warning("%s holds a finished run (its final checkpoint is %s): starting a new run over it. To "
                            "train that run further instead: --resume with a larger --max_steps", self.output_dir,
                            found[1].name)
                shutil.rmtree(checkpoints_dir(self.output_dir))
            dist.barrier()
        elif found is not None:
            raise UserError(f"{self.output_dir} already holds checkpoints of an unfinished run: pass --resume to "
                            "continue it, or give another --output_dir")
        if self.rank == 0:
            remove_partial_checkpoints(self.output_dir)  # left by a run killed while saving
        return start

    def _intact(self) -> tuple[int, Path]:
        """The newest checkpoint that reads back in full; damaged newer ones are named and passed over."""
        damaged = []
        for step, path in reversed(complete_checkpoints(self.output_dir)):
            problems = checkpoint_problems(path, self.world_size, self.output_name)
            if not problems:
                if damaged and self.rank == 0:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return step, path
            damaged.append(f"{path}: " + "; ".join(problems))
            if self.rank == 0:
                log.warning("checkpoint %s is damaged (%s): trying the one before it", path, "; ".join(problems))
        raise UserError("--resume: every checkpoint is damaged:\n  " + "\n  ".join(damaged)
                        + "\nleave out --resume (and move the checkpoints away) to start a new run")

    # ---------------------------------------------------------------------------------- writing
    def save(self, step: int, engine, client: dict, rng: dict, write_output: Callable[[Path], None]) -> Path:
        """Write checkpoint step-<step>: DeepSpeed's state (with `client`), this rank's `rng` (rng_state()),
        the run state, and the method's output through `write_output(path)` (a collective itself).

        A failed write (a full disk, say) removes the partial directory and raises WriteFailed; the
        previous checkpoint stays as it was, and the newest `keep` are kept."""
        tmp = temporary_dir(self.output_dir, step)
        # DeepSpeed's save is collective inside: a rank that fails part-way leaves the others waiting
        # in it for ever. So every rank first checks there is room for a checkpoint, and all refuse
        # together where one lacks it.
        needed = self.needed_bytes()
        free = shutil.disk_usage(self.output_dir).free
        if not self._all_ranks(free >= needed):
            raise WriteFailed(self.failure(f"checkpoint step-{step}", OSError(
                f"a checkpoint needs about {needed / 2**20:.2f} MiB; not written")))
        error = None
        try:
            if self.rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            dist.barrier()
            engine.save_checkpoint(str(tmp), tag=STATE_TAG, client_state=client, save_latest=False,
                                   exclude_frozen_parameters=True)
            save_rng(tmp, self.rank, rng)
            if self.rank == 0:
                write_run_state(tmp, step, client["total_steps"])
            if self.output_name:
                write_output(tmp / self.output_name)
        except WRITE_ERRORS as e:
            error = e
        if not self._all_ranks(error is None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(self.failure(f"checkpoint step-{step}", error))
        path = final_dir(self.output_dir, step)
        if self.rank == 0:
            publish(self.output_dir, step, keep=self.keep)
            log.info("checkpoint %s", path)
        dist.barrier()
        return path

    def needed_bytes(self) -> int:
        """About what one checkpoint takes on disk: the newest one's size where there is one, else
        first_bytes; with a margin of a quarter."""
        found = self.newest()
        size = sum(f.stat().st_size for f in found[1].rglob("*") if f.is_file()) if found else self.first_bytes
        return int(size * 1.25)

    def failure(self, what: str, error: BaseException | None) -> str:
        """The message for `what` that could not be written: why, the room left, and what is kept."""
        free = shutil.disk_usage(self.output_dir).free
        # torch.save says "unexpected pos ..." where the disk filled up, not ENOSPC
        full = getattr(error, "errno", None) == errno.ENOSPC or free < 64 * 2**20
        found = self.newest()
        kept = (f"the previous checkpoint {found[1]} is intact: make room, then --resume" if found
                else "there is no earlier checkpoint")
        return (f"could not write {what} under {self.output_dir}" + (": the disk is full" if full else "")
                + f" ({error}; {free / 2**20:.2f} MiB free there); {kept}")

    def _all_ranks(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (a collective; NCCL reduces CUDA tensors only)."""
        flag = torch.tensor([float(ok)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


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
        """Take the lock; returns a note when a dead run's lock was taken over. Raises UserError when a
        live run holds it."""
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
