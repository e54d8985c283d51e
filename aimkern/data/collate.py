"""Batches of uint8 images: stacked once, straight into the memory the batch leaves its worker in.

A DataLoader worker hands its batch to the main process through shared memory; a tensor stacked into
ordinary memory is copied there again on the way. ``stack_images`` allocates the (B, C, S, S) batch in
shared memory when it runs in a worker (what torch's default_collate does), so each image is copied once
(in its channels-last layout, see ``stack_images``),
and never to float: the batch stays uint8 (4x less to move than float32) until the training step
normalizes it on the device. Pinning (DataLoader ``pin_memory``, CUDA only) then copies it once more into
page-locked memory, from which the host-to-device copy runs with ``non_blocking=True``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .bad import BadRecord


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[uint8 (C, S, S)] * B -> uint8 (B, C, S, S), in shared memory inside a DataLoader worker.

    The decoder's crops are (C, S, S) views of (S, S, C) memory (channels-last strides, what torch's uint8
    resize writes); the batch keeps that layout (``torch.channels_last``), so each image is one plain copy:
    laying it out as (C, S, S) planes on the CPU is a transposing copy that costs 15x more (measured 250 us
    against 16 us a 224-px image). The device does that transposition inside ``model_input``'s
    normalization, which writes a contiguous float32 batch. Images in the usual layout give a contiguous
    batch."""
    if not images:
        raise ValueError("images must hold at least one image")
    first = images[0]
    if first.dtype != torch.uint8 or first.dim() != 3:
        raise TypeError(f"images must be uint8 (C, S, S) tensors, got {first.dtype} {tuple(first.shape)}")
    bad = next((tuple(im.shape) for im in images if im.shape != first.shape or im.dtype != torch.uint8), None)
    if bad is not None:
        raise ValueError(f"images must all be uint8 {tuple(first.shape)}, got one {bad}")
    c, h, w = first.shape
    channels_last = c > 1 and first.stride(0) == 1
    shape = (len(images), h, w, c) if channels_last else (len(images), c, h, w)
    buf = worker_buffer(first, shape)
    out = buf.permute(0, 3, 1, 2) if channels_last else buf  # (B, C, S, S) either way
    for i, image in enumerate(images):
        out[i].copy_(image)
    return out


def worker_buffer(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device: in shared memory
    inside a DataLoader worker (so handing it to the main process copies nothing), ordinary memory elsewhere."""
    if torch.utils.data.get_worker_info() is not None:
        # As torch's default_collate does it (the same private calls, present from torch 2.0 to 2.14).
        numel = 1
        for size in shape:
            numel *= size
        storage = like._typed_storage()._new_shared(numel, device=like.device)
        return like.new(storage).resize_(*shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def collate_images(items: Sequence[Tuple[torch.Tensor, List[BadRecord]]]) -> Tuple[torch.Tensor, List[BadRecord]]:
    """[(uint8 (C, S, S), records)] -> (uint8 (B, C, S, S), all records in row order)."""
    return stack_images([image for image, _ in items]), [r for _, records in items for r in records]
