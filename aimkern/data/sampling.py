"""Which samples a rank reads at each step: global sample positions -> dataset indices and seeds.

A run reads global sample positions 0, 1, 2, ... in order; step s of a run that began at position ``start``
reads positions ``start + s * B`` .. ``start + (s + 1) * B - 1`` for a global batch of B, and rank r of W takes
rows [r * B / W, (r + 1) * B / W) of them. An order object maps positions to dataset indices (``SampleOrder``:
a seeded permutation per epoch; ``aimkern.data.order.ShardWindowOrder``: shard-aware), so every batch is a
pure function of (seed, position): resuming at a saved position repeats an uninterrupted run exactly, and the
DataLoader's worker count never changes a batch.
"""
from __future__ import annotations

from typing import Iterator, List, Protocol, Tuple

import torch

from .seeds import TAG_SAMPLE, mix_seed


class Order(Protocol):
    """Global sample position -> dataset index."""

    n: int

    def indices(self, positions: torch.Tensor) -> torch.Tensor: ...


class SampleOrder:
    """Global sample position -> dataset index: a fresh seeded permutation of the n samples each epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.seed = n, seed
        self._perms: dict = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # positions only move forward: drop old epochs
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        """(P,) int64 global positions -> (P,) int64 dataset indices."""
        epochs, within = positions // self.n, positions % self.n
        out = torch.empty_like(positions)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out


def rank_positions(start: int, step: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """The global sample positions rank ``rank`` reads at ``step`` steps after position ``start``."""
    local = global_batch // world
    first = start + step * global_batch + rank * local
    return torch.arange(first, first + local, dtype=torch.int64)


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample read at global ``position`` (also the seed of its replacements)."""
    return mix_seed(seed, position, TAG_SAMPLE)


class PositionBatches(torch.utils.data.Sampler):
    """Infinite DataLoader batch sampler: the (index, sample seed) keys of this rank's rows of each global batch.

    A dataset indexed by these keys decodes and augments sample ``index`` with ``seed`` alone, so a batch is the
    same whichever worker, process or run reads it."""

    def __init__(self, order: Order, *, global_batch: int, rank: int, world: int, seed: int, start: int):
        self.order, self.seed = order, seed
        self.global_batch, self.rank, self.world, self.start = global_batch, rank, world, start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = 0
        while True:
            pos = rank_positions(self.start, step, self.global_batch, self.rank, self.world)
            idx = self.order.indices(pos)
            yield [(i, sample_seed(self.seed, p)) for i, p in zip(idx.tolist(), pos.tolist())]
            step += 1
