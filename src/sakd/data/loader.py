"""A deterministic, resumable, shardable loader of packed windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sakd.data.batch import Batch
from sakd.data.packing import Window, collate_windows
from sakd.data.tokenize import InputFormat
from sakd.errors import UserError


@dataclass(frozen=True)
class Shard:
    """This process's part of the data: rank `rank` of `world_size` data-parallel processes."""

    rank: int = 0
    world_size: int = 1


class WindowLoader:
    """Batches of windows in a seeded order per epoch; its position is a checkpointable state.

    Epoch e visits the windows in the permutation drawn from `np.random.default_rng([seed, e])` (in order
    when `shuffle` is False). Global batches are consecutive slices of `batch_size * world_size` windows of
    that order, and rank r (`shard`) takes the r-th `batch_size` slice of each. With `drop_last` an incomplete
    global batch is dropped; without it, the tail is split as evenly as possible between ranks (a rank may
    then get an empty batch when fewer windows than ranks remain).
    """

    def __init__(
        self,
        windows: list[Window],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        shard: Shard = Shard(),
        student: InputFormat | int = 0,
        teacher: InputFormat | int | None = None,
        drop_last: bool = True,
    ) -> None:
        rank, world_size = shard.rank, shard.world_size
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        global_batch = batch_size * world_size
        if drop_last and len(windows) < global_batch:
            raise UserError(
                f"the data gives {len(windows)} windows, fewer than one batch of {batch_size} x {world_size} "
                "processes: add data or lower the batch size or max_length"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.student = student  # each model's input format (`collate_windows`)
        self.teacher = teacher
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order_epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return len(self.windows) // global_batch
        return -(-len(self.windows) // global_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(num_windows,) int64: the window indices of `epoch` in visiting order."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            else:
                self._order = np.arange(len(self.windows), dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def rank_indices(self, epoch: int, batch_in_epoch: int) -> np.ndarray:
        """The window indices this rank reads at a position: (batch_size,), fewer only in a kept tail."""
        global_batch = self.batch_size * self.world_size
        start = batch_in_epoch * global_batch
        global_indices = self.epoch_order(epoch)[start : start + global_batch]
        if len(global_indices) == global_batch:
            return global_indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return np.array_split(global_indices, self.world_size)[self.rank]

    def next_batch(self) -> Batch:
        """The batch at the current position; the position then moves on, into the next epoch at its end."""
        if self.batches_per_epoch == 0:
            raise ValueError("the loader has no windows")
        indices = self.rank_indices(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        windows = [self.windows[i] for i in indices]
        return collate_windows(windows, self.student, self.teacher)

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch's batches, moving the position as `next_batch` does."""
        epoch = self.epoch
        while self.epoch == epoch and self.batches_per_epoch > 0:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "num_windows": len(self.windows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Jump to a saved position (no batches are built for the skipped ones); the saved seed wins.

        The position counts global batches, so it carries over between process counts that keep
        batch_size x world_size. A state with a `global_batch` entry (the global batch it was counted in, as
        training checkpoints store it) that differs from this loader's is converted through the windows
        consumed, rounded up so that none is read twice.
        """
        if state["num_windows"] != len(self.windows):
            raise ValueError(
                f"the saved data position is for {state['num_windows']} windows, this data gives "
                f"{len(self.windows)}: the data or max_length changed since the checkpoint"
            )
        self.seed = int(state["seed"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        saved, mine = state.get("global_batch"), self.batch_size * self.world_size
        if saved is not None and saved != mine:
            self.batch_in_epoch = -(-self.batch_in_epoch * saved // mine)
        if 0 < self.batches_per_epoch <= self.batch_in_epoch:  # a larger batch size than when saved
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self._order_epoch = None
