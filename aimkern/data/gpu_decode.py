"""``--decode gpu``: JPEG batches decoded on the GPU (nvJPEG via torchvision), cropped and resized there.

DataLoader workers only read each sample's bytes and header (size -> seeded crop box and flip, the same
draw as the CPU path); the training process decodes the batch with one ``torchvision.io.decode_jpeg(list,
device="cuda")`` call and crops / resizes each image with ``F.interpolate`` (bicubic, antialiased). What
the CPU still does per image is a tar read and a header parse. Non-JPEG samples (png, webp) are decoded to
full-size pixels by the workers and cropped on the GPU the same way. Pixels differ from the CPU path's
(another decoder and resampler), so a run keeps one ``--decode`` from start to resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .decode import Box


def gpu_decode_problem(device) -> Optional[str]:
    """Why ``--decode gpu`` cannot run here (None when it can)."""
    if not torch.cuda.is_available():
        return ("--decode gpu decodes JPEGs with nvJPEG on a CUDA device, and none is available here; "
                "use --decode cpu (the default)")
    if device is not None and torch.device(device).type != "cuda":
        return f"--decode gpu needs the training device to be CUDA, got --device {device}"
    return None


@dataclass
class GpuItem:
    """One sample as a worker hands it over: ``jpeg`` bytes (uint8 (L,)) or decoded ``pixels`` (uint8 (C, H, W)),
    with its crop box (source pixels), flip, and the (index, seed) key it was read for."""

    jpeg: Optional[torch.Tensor]
    pixels: Optional[torch.Tensor]
    box: Box
    flip: bool
    key: Tuple[int, int]


def _crop_resize(image: torch.Tensor, box: Box, flip: bool, img_size: int) -> torch.Tensor:
    """uint8 (C, H, W) on the GPU -> uint8 (C, S, S)."""
    left, top, right, bottom = (int(round(v)) for v in box)
    crop = image[:, top:bottom, left:right].unsqueeze(0).float()
    out = F.interpolate(crop, size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out


def decode_batch(items: List[GpuItem], img_size: int, in_chans: int, device: torch.device,
                 fallback: Callable[[int], Tuple[torch.Tensor, list]]) -> Tuple[torch.Tensor, list]:
    """Items -> uint8 (B, in_chans, S, S) on ``device``, and the ``BadRecord``s of the samples skipped on the way.

    ``fallback(i)`` gives row i's replacement as a CPU-decoded uint8 (C, S, S) (with its own skip records)
    when the GPU decoder refuses row i's bytes.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
    rows: List[Optional[torch.Tensor]] = [None] * len(items)
    skipped: list = []
    jpeg_rows = [i for i, it in enumerate(items) if it.jpeg is not None]
    decoded = {}
    if jpeg_rows:
        try:
            images = decode_jpeg([items[i].jpeg for i in jpeg_rows], mode=mode, device=device)
            decoded = dict(zip(jpeg_rows, images))
        except RuntimeError:  # one bad JPEG fails the batch call: decode one by one to find it
            for i in jpeg_rows:
                try:
                    decoded[i] = decode_jpeg(items[i].jpeg, mode=mode, device=device)
                except RuntimeError:
                    pass
    for i, it in enumerate(items):
        if it.jpeg is None:
            image = it.pixels.to(device, non_blocking=True)
        elif i in decoded:
            image = decoded[i]
        else:
            rows[i], more = fallback(i)
            rows[i] = rows[i].to(device)
            skipped.extend(more)
            continue
        rows[i] = _crop_resize(image, it.box, it.flip, img_size)
    return torch.stack(rows), skipped
