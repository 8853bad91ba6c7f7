"""The protocol every batch iterator keeps, and deterministic, checkpointable batches over an
in-memory source (the digits teacher's stages; the grain pipeline, input_pipeline.py, is the other).

The position is two integers (epoch, offset): the permutation of an epoch is a pure
function of (seed, epoch), so restoring the position continues with exactly the next
example. Each process takes its contiguous slice of every global batch.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Protocol

import numpy as np


def local_batch_size(batch_size: int, process_count: int, what: str = "batch_size") -> int:
    """Each process's share of a global batch; a ValueError unless it is a positive multiple of the processes."""
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"{what} {batch_size} is not a positive multiple of the {process_count} processes")
    return batch_size // process_count


class Batches(Protocol):
    """What the loop reads: this process's batches, with a position a checkpoint holds."""

    def __next__(self) -> dict: ...

    def peek(self) -> dict:
        """The next batch, the position untouched (to compile the step for its shapes)."""

    def state(self) -> dict:
        """The position, JSON-able; ``restore`` of it continues with exactly the next example."""

    def restore(self, state: dict) -> None: ...

    @property
    def counts(self) -> Mapping[str, int]:
        """Examples read, skipped (``skipped_*``, by reason) and repaired so far; {} if none are counted."""

    def close(self) -> None: ...


@dataclasses.dataclass
class Batcher:
    images: np.ndarray            # uint8 [N, R, R, 3]
    token_ids: np.ndarray         # int32 [N, L]
    global_batch: int
    seed: int = 0
    random_flip: bool = False
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        local_batch_size(self.global_batch, self.process_count)
        if len(self.images) < self.global_batch:
            raise ValueError(f"the data has {len(self.images)} examples, fewer than one batch "
                             f"of {self.global_batch}")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def peek(self) -> dict:
        return next(dataclasses.replace(self))

    @property
    def counts(self) -> Mapping[str, int]:
        return {}  # every example in memory is good

    def close(self) -> None:
        pass

    def __next__(self) -> dict:
        """This process's part of the next global batch: pixels [-1, 1] NCHW, token ids."""
        if self.offset + self.global_batch > len(self.images):  # drop the remainder
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.offset:self.offset + self.global_batch]
        per = local_batch_size(self.global_batch, self.process_count)
        mine = idx[self.process_index * per:(self.process_index + 1) * per]
        self.offset += self.global_batch
        px = self.images[mine].astype(np.float32) / 127.5 - 1.0  # [b, R, R, 3]
        if self.random_flip:
            flip = np.random.default_rng([self.seed, self.epoch, self.offset]).random(len(mine)) < 0.5
            px[flip] = px[flip, :, ::-1]
        return {"pixels": px.transpose(0, 3, 1, 2), "input_ids": self.token_ids[mine]}
