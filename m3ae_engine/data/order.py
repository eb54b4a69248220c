"""Sample order shared by the Pillow, nvJPEG and text loaders: per-epoch permutations, rank split, resume
(and the resume-state and length rules every loader, DALI included, follows).

Epoch e visits every sample once in the order `permutation(seed, e)` (or file order without
shuffling). Rank r of W takes the permuted positions r, r + W, r + 2W, ...: ranks read disjoint
samples that cover the set; when W does not divide N the last positions wrap to the start of the
permutation (as torch's DistributedSampler pads), so every rank has ceil(N / W) samples per epoch
and no rank waits on another. Each rank's stream is its epochs back to back; a loader's position is
the number of samples it has yielded, so resume is exact.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np


class RankOrder:
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, epochs: Optional[int] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_samples < 1:
            raise ValueError("no samples")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.per_rank = math.ceil(num_samples / world_size)
        self.epochs = epochs
        self._cache = (None, None)

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cache  # one read: safe when reader threads ask for different epochs at once
        if cached[0] != epoch:
            perm = (np.random.default_rng([self.seed, 3, epoch]).permutation(self.n) if self.shuffle
                    else np.arange(self.n))
            cached = self._cache = (epoch, perm)
        return cached[1]

    def at(self, pos: int) -> Tuple[int, int]:
        """Position in this rank's stream -> (epoch, sample index)."""
        epoch, i = divmod(pos, self.per_rank)
        return epoch, int(self.permutation(epoch)[(i * self.world + self.rank) % self.n])

    def num_batches(self, batch_size: int, drop_last: bool = True) -> Optional[int]:
        """Batches in the whole stream (None = endless)."""
        if self.epochs is None:
            return None
        total = self.epochs * self.per_rank
        return total // batch_size if drop_last else math.ceil(total / batch_size)

    def total(self) -> Optional[int]:
        return None if self.epochs is None else self.epochs * self.per_rank


RESUME_IDENTITY = ("batch_size", "seed", "world_size", "num_samples")  # must match for an exact resume


def resume_state(loader) -> dict:
    """The position of a loader and what identifies its stream (checked by check_resume)."""
    return {k: getattr(loader, k) for k in ("step", "rank") + RESUME_IDENTITY}


def check_resume(loader, state: dict) -> int:
    """The step to resume at; a ValueError when the state belongs to other data, batch size, seed or world."""
    for k in RESUME_IDENTITY:
        if k in state and state[k] != getattr(loader, k):
            raise ValueError(f"loader state has {k}={state[k]} but this loader has {getattr(loader, k)}: "
                             f"exact resume needs the same data, batch size, seed and world size")
    return int(state["step"])


def finite_length(num_batches: Optional[int]) -> int:
    if num_batches is None:
        raise TypeError("endless loader (epochs=None) has no length")
    return num_batches
