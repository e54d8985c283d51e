"""The order samples are read in: global sample position -> global sample index, shard-aware.

``aimkern.data.sampling.SampleOrder`` draws one permutation of all n samples per epoch: 8 bytes per sample
(16 GB for DFN-2B) and every batch touching a different random shard. Here each epoch permutes the
shards, cuts that shard order into windows of ``window`` shards, and permutes the samples within each
window. Memory is O(shards + window's samples), a rank's DataLoader workers keep only about one window of
shards open, and the order is still a pure function of (seed, position): resume is exact and ranks that
read disjoint positions read disjoint samples. (A window of 16 shards of 10k images mixes 160k images,
about what a webdataset shuffle buffer per worker mixes, but reproducibly.)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from .seeds import TAG_SHARD_ORDER, TAG_WINDOW, mix_seed

WINDOW_SHARDS = 16
_CACHED = 4  # epochs / windows whose permutations are kept (positions only move forward)


def _randperm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class _Cache(OrderedDict):
    def get_or(self, key, make):
        if key not in self:
            if len(self) >= _CACHED:
                self.popitem(last=False)
            self[key] = make()
        return self[key]


class ShardWindowOrder:
    """Position p -> global sample index (``ShardList`` numbering), the interface of ``SampleOrder``.

    Args:
        counts: samples per shard, (S,).
        seed: the run's seed.
        window: shards whose samples are shuffled together.
    """

    def __init__(self, counts: Sequence[int], seed: int, window: int = WINDOW_SHARDS):
        self.counts = torch.as_tensor(list(counts), dtype=torch.int64)
        self.n = int(self.counts.sum())
        if self.n < 1:
            raise ValueError("the training data is empty")
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # (S,) first global index of each shard
        self.seed, self.window = seed, max(1, window)
        self._epochs, self._windows = _Cache(), _Cache()

    def _epoch(self, epoch: int):
        """(shard order (S,), end position of each window within the epoch (G,))."""
        def make():
            shard_order = _randperm(len(self.counts), mix_seed(self.seed, epoch, TAG_SHARD_ORDER))
            sizes = self.counts[shard_order].split(self.window)
            return shard_order, torch.cumsum(torch.stack([s.sum() for s in sizes]), 0)
        return self._epochs.get_or(epoch, make)

    def _window(self, epoch: int, g: int):
        """(shards of window g (k,), end of each within the window (k,), permutation of its samples)."""
        def make():
            shard_order, _ = self._epoch(epoch)
            shards = shard_order[g * self.window:(g + 1) * self.window]
            ends = torch.cumsum(self.counts[shards], 0)
            return shards, ends, _randperm(int(ends[-1]), mix_seed(self.seed, epoch, g, TAG_WINDOW))
        return self._windows.get_or((epoch, g), make)

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        """(P,) int64 global positions -> (P,) int64 global sample indices."""
        epochs, within = positions // self.n, positions % self.n
        out = torch.empty_like(positions)
        for e in epochs.unique().tolist():
            sel_e = epochs == e
            window_ends = self._epoch(e)[1]
            groups = torch.searchsorted(window_ends, within, right=True)
            for g in groups[sel_e].unique().tolist():
                sel = sel_e & (groups == g)
                shards, ends, perm = self._window(e, g)
                first = int(window_ends[g - 1]) if g > 0 else 0
                local = perm[within[sel] - first]  # position within the window's concatenated samples
                k = torch.searchsorted(ends, local, right=True)
                inner = local - (ends[k] - self.counts[shards[k]])
                out[sel] = self.starts[shards[k]] + inner
        return out
