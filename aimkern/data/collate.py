"""Batches of uint8 images: stacked once, straight into the memory the batch leaves its worker in.

A DataLoader worker hands its batch to the main process through shared memory; a tensor stacked into
ordinary memory is copied there again on the way. ``stack_images`` allocates the (B, C, S, S) batch in
shared memory when it runs in a worker (what torch's default_collate does), so each image is copied once,
and never to float: the batch stays uint8 (4x less to move than float32) until the training step
normalizes it on the device. Pinning (DataLoader ``pin_memory``, CUDA only) then copies it once more into
page-locked memory, from which the host-to-device copy runs with ``non_blocking=True``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .bad import BadRecord


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[uint8 (C, S, S)] * B -> uint8 (B, C, S, S), in shared memory inside a DataLoader worker."""
    if not images:
        raise ValueError("images must hold at least one image")
    first = images[0]
    if first.dtype != torch.uint8 or first.dim() != 3:
        raise TypeError(f"images must be uint8 (C, S, S) tensors, got {first.dtype} {tuple(first.shape)}")
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # As torch's default_collate does it (the same private calls, present from torch 2.0 to 2.14).
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(list(images), out=out)


def collate_images(items: Sequence[Tuple[torch.Tensor, List[BadRecord]]]) -> Tuple[torch.Tensor, List[BadRecord]]:
    """[(uint8 (C, S, S), records)] -> (uint8 (B, C, S, S), all records in row order)."""
    return stack_images([image for image, _ in items]), [r for _, records in items for r in records]
