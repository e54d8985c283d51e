"""The model's input from a stream's batch: uint8 images normalized on their device, inside the step.

Image streams (ImageFolder, shards, ``--decode gpu``) yield uint8 (B, C, S, S) batches on the device;
``model_input`` turns one into float32 ``(x / 255 - mean) / std`` (``aimkern.data.decode.MEAN_STD``, what
torchvision's ToTensor + Normalize computed on the CPU before) in one elementwise pass, ``x * scale + shift``.
The in-memory streams (digits, synthetic) already yield the model's float input, which passes unchanged.
The result equals the CPU float path to round-off (a multiply-add against a subtract and a divide: at most
a few float32 ulps); tests/test_data_decode.py checks the loss of a step matches.

Elementwise ops keep float32 under autocast, so calling this inside the training step's autocast (as
``aimkern.train.step.train_step`` does) gives the same tensor as outside it; the pixel loss's targets are
computed from it, exactly as from the CPU-normalized images before.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Tuple

import torch

from .decode import check_channels, pixel_affine

_AFFINE: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device, in_chans: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 (1, C, 1, 1) on ``device`` (``aimkern.data.decode.pixel_affine``'s numbers):
    made once per device, so a step copies nothing to the GPU for them (a host-to-device copy of a fresh
    tensor would be one more transfer a step)."""
    key = (str(device), in_chans)
    if key not in _AFFINE:
        _AFFINE[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device)
                             for v in pixel_affine(in_chans))
    return _AFFINE[key]


def model_input(batch: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalized float32 (B, C, H, W) on the same device; a float batch passes as is.

    Raises TypeError for another dtype, ValueError when C differs from ``in_chans``."""
    if batch.is_floating_point():
        return batch
    if batch.dtype != torch.uint8:
        raise TypeError(f"batch must be uint8 images or float model input, got {batch.dtype}")
    check_channels(in_chans)
    if batch.dim() != 4 or batch.shape[1] != in_chans:
        raise ValueError(f"batch must be (B, {in_chans}, H, W), got {tuple(batch.shape)}")
    scale, shift = _affine(batch.device, in_chans)
    # One pass: reads uint8 in whatever layout the batch has (the CPU streams ship channels-last) and writes
    # a contiguous float32 batch, the layout the patch embedding reads.
    out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
    return torch.addcmul(shift, batch, scale, out=out)


class ModelInputs:
    """An iterable of batches -> the same batches as ``model_input`` (e.g. the tokenizer's fitting images)."""

    def __init__(self, batches: Iterable[torch.Tensor], in_chans: int):
        self.batches, self.in_chans = batches, in_chans

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            yield model_input(batch, self.in_chans)
