"""``--data`` -> a ``BatchStream``: the digits, the synthetic pool, an ImageFolder tree or WebDataset shards.

Every stream maps a global sample position (0, 1, 2, ... over the whole run) to a sample through a seeded
order (``sampling``), so it is a pure function of (seed, position): resuming at the saved position gives
exactly the batches an uninterrupted run would have seen, and under torchrun rank r of W takes rows
[r * B / W, (r + 1) * B / W) of each global batch of B.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Protocol, runtime_checkable

import torch

from .bad import BadRecord
from .digits import digits_split, digits_to_images
from .folder import FolderStream
from .memory import InMemoryStream
from .seeds import TAG_SYNTHETIC, mix_seed
from .shards import is_shard_spec
from .shard_stream import ShardStream

SYNTHETIC_POOL = 512  # random images kept on the device for --data synthetic


@runtime_checkable
class BatchStream(Protocol):
    """What the trainer reads: an iterable of this rank's (local batch, C, S, S) batches on the device: uint8
    images from the image sources (ImageFolder, shards, ``--decode gpu``; the training step normalizes them
    on the device with ``aimkern.data.inputs.model_input``) or the model's float32 input from the in-memory
    ones (digits, synthetic), which ``model_input`` passes unchanged.

    ``take_bad()`` returns the samples that failed to decode since the last call (each replaced by a seeded
    draw, so the batch kept its size); ``num_samples`` is the dataset's size, what a --max-bad-samples
    fraction refers to."""

    num_samples: Optional[int]

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def take_bad(self) -> List[BadRecord]: ...


def make_stream(data: str, *, img_size: int, in_chans: int, global_batch: int, rank: int, world: int, seed: int,
                start: int, device: torch.device, workers: int = 0, decode: str = "cpu") -> BatchStream:
    """The training stream for ``--data``, beginning at global sample position ``start``. ``decode`` ('cpu' or
    'gpu') applies to shards."""
    common = dict(global_batch=global_batch, rank=rank, world=world, seed=seed, start=start)
    if data == "digits":
        x_train = digits_split()[0].to(device)
        return InMemoryStream(x_train, lambda x: digits_to_images(x, img_size, in_chans), **common)
    if data == "synthetic":
        gen = torch.Generator().manual_seed(mix_seed(seed, TAG_SYNTHETIC))
        pool = torch.randn(SYNTHETIC_POOL, in_chans, img_size, img_size, generator=gen).to(device)
        return InMemoryStream(pool, lambda x: x, **common)
    if is_shard_spec(data):
        return ShardStream(data, img_size, in_chans, workers=workers, device=device, decode=decode, **common)
    if decode != "cpu":
        raise ValueError(f"--decode {decode} reads WebDataset shards only, and --data {data!r} is an ImageFolder")
    return FolderStream(data, img_size, in_chans, workers=workers, device=device, **common)
