"""Streams over a tensor already on the device: the digits and the synthetic pool (no input pipeline)."""
from __future__ import annotations

from typing import Callable, Iterator, List

import torch

from .bad import BadRecord
from .sampling import SampleOrder, rank_positions


class InMemoryStream:
    """Infinite local batches gathered from ``base`` (on the device), then ``transform``ed (e.g. upsampled).

    A ``BatchStream`` (see ``aimkern.data.sources``); in-memory samples always decode, so ``take_bad()`` is
    always empty, and ``num_samples`` is the number of rows of ``base``."""

    def __init__(self, base: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], *, global_batch: int,
                 rank: int, world: int, seed: int, start: int):
        self.base, self.transform = base, transform
        self.global_batch, self.rank, self.world, self.start = global_batch, rank, world, start
        self.order = SampleOrder(base.shape[0], seed)
        self.num_samples = base.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while True:
            idx = self.order.indices(rank_positions(self.start, step, self.global_batch, self.rank, self.world))
            # non_blocking: a blocking host-to-device copy would wait for the GPU every step
            yield self.transform(self.base.index_select(0, idx.to(self.base.device, non_blocking=True)))
            step += 1

    def take_bad(self) -> List[BadRecord]:
        return []
