"""The order samples are read in: a seeded permutation per epoch, sharded across ranks, resumable."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from m2pt_fast.errors import UserError


class EpochShardSampler(Sampler[int]):
    """This rank's share of a permutation of range(size) seeded by (seed, epoch).

    Each epoch uses the same number of whole micro-batches on every rank (a multiple of the
    accumulation steps, so every optimizer step is complete); the few samples left over are
    dropped for that epoch only. `set_position(epoch, start_batch)` starts an epoch part-way,
    which is how a resumed run reads exactly the samples an uninterrupted one would.
    """

    def __init__(self, size: int, num_replicas: int, rank: int, seed: int, batch_size: int, accumulation: int = 1):
        self.size, self.num_replicas, self.rank, self.seed = size, num_replicas, rank, seed
        self.batch_size = batch_size
        per_rank_batches = size // num_replicas // batch_size
        self.batches_per_epoch = per_rank_batches // accumulation * accumulation
        if self.batches_per_epoch == 0:
            need = num_replicas * batch_size * accumulation
            raise UserError(
                f"the data set has {size} usable samples but one optimizer step needs {need} "
                f"({num_replicas} processes x {batch_size} per device x {accumulation} accumulation steps): "
                "add data or lower --per_device_train_batch_size / --gradient_accumulation_steps"
            )
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside an epoch of {self.batches_per_epoch} micro-batches")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        mine = order[self.rank :: self.num_replicas][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
