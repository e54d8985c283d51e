"""CPU decode of one training image: seeded random-resized crop + flip, with PIL's JPEG draft mode.

The augmentation is ``aimkern.train``'s ImageFolder recipe (RandomResizedCrop(scale=(0.4, 1), ratio=(3/4,
4/3)), bicubic, horizontal flip), drawn from the sample's own seed so it does not depend on the process or
worker. Draft mode asks libjpeg to decode at 1/2, 1/4 or 1/8 scale in the DCT domain, the smallest scale at
which the crop still has at least the output's pixels, so the decode cost follows the output size, not the
stored size. Output is uint8 (C, S, S): 4x less to move between processes than float; the stream
normalizes on the device.
"""
from __future__ import annotations

import io
import math
import random
from typing import Tuple

import numpy as np
import torch

SCALE = (0.4, 1.0)
RATIO = (3 / 4, 4 / 3)
# Normalization after /255 (ImageNet statistics; their channel mean for grayscale): the one table the shard
# stream, aimkern.train's ImageFolder transform and aimkern.eval's transform all use.
MEAN_STD = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.449,), (0.226,))}

Box = Tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def check_channels(in_chans: int) -> None:
    if in_chans not in MEAN_STD:
        raise ValueError(f"images are read as RGB or grayscale, but the preset has in_chans={in_chans}")


def crop_box(width: int, height: int, rng: random.Random) -> Box:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop of clamped ratio)."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def augmentation(width: int, height: int, seed: int) -> Tuple[Box, bool]:
    """The crop box and the flip of a sample, a function of its size and seed only."""
    rng = random.Random(seed)
    box = crop_box(width, height, rng)
    return box, rng.random() < 0.5


def pil_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def open_image(data: bytes):
    """PIL image of encoded bytes (header read only; pixels are decoded on first use)."""
    from PIL import Image

    return Image.open(io.BytesIO(data))


def decode_crop(data: bytes, img_size: int, in_chans: int, seed: int, draft: bool = True) -> torch.Tensor:
    """Encoded image -> uint8 (in_chans, img_size, img_size): seeded random-resized crop, bicubic, flip."""
    from PIL import Image

    im = open_image(data)
    width, height = im.size
    box, flip = augmentation(width, height, seed)
    mode = pil_mode(in_chans)
    if draft and im.format == "JPEG":
        # The smallest DCT scale that keeps >= img_size pixels across the crop in both directions.
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        im.draft(mode, (math.ceil(width * img_size / crop_w), math.ceil(height * img_size / crop_h)))
        sx, sy = im.size[0] / width, im.size[1] / height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if im.mode != mode:
        im = im.convert(mode)
    out = im.resize((img_size, img_size), Image.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.array(out)  # a writable copy (torch refuses to wrap PIL's read-only buffer)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> float32, /255 then ImageNet mean / std (as ToTensor + Normalize)."""
    mean, std = (torch.tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1) for v in MEAN_STD[in_chans])
    return images.float().sub_(mean * 255).div_(std * 255)  # two in-place passes (the main process does this)
