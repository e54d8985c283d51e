"""CPU decode of one image: header -> crop box -> DCT-scaled libjpeg-turbo decode -> uint8 crop, resize, flip.

The one decoder of every CPU source (ImageFolder, shards, the evaluation transform). In order:
1. read the size from the header (``jpeg.jpeg_size``; no pixels decoded);
2. draw the crop box and flip from the size (``augmentation``: aimkern.train's recipe, RandomResizedCrop(
   scale=(0.4, 1), ratio=(3/4, 4/3)) + horizontal flip, from the sample's own seed, so the draw is a pure
   function of (seed, position) and ``--resume`` stays exact; or the evaluation's centre view);
3. pick the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the box still covers the output size
   (``jpeg.dct_denominator``) and decode at that scale with libjpeg-turbo (``simplejpeg``);
4. crop, resize (antialiased bicubic) and flip in uint8 (``resize.crop_resize``).
PNG, WebP and anything libjpeg-turbo refuses (a broken or CMYK JPEG) are decoded by PIL at full size and
go through step 4 the same way; a file PIL cannot read either raises PIL's error (a bad sample).

Output is uint8 (C, S, S): 4x less to move between processes and to the GPU than float32; the training step
normalizes on the device (``aimkern.data.inputs.model_input``).

How close a scaled decode is to a full one: the DCT scale is a block average of the image (an 8x8 block
becomes 8/d x 8/d pixels) where the full path's antialiased resize does the same averaging with a wider
filter, and the box is cut at the scaled image's pixels (its edges move by at most half a scaled pixel,
d / 2 stored pixels). On a photo-like 1024 x 768 JPEG cropped to 112 px (1/2 and 1/4 scales) the scaled
decode stays within a mean of 3 grey levels (of 255) of PIL's full-decode-then-resize, the full-size path
within 1.5; tests/test_data_decode.py holds the decoder to both. The gap grows with detail near the output's
pixel scale: a 160 x 120 image cropped to 48 px at 1/2 scale measured 3.9.
"""
from __future__ import annotations

import io
import math
import random
import struct
from typing import Callable, Tuple

import numpy as np
import torch

from . import jpeg
from .resize import PixelBox, crop_resize

SCALE = (0.4, 1.0)
RATIO = (3 / 4, 4 / 3)
# Normalization after /255 (ImageNet statistics; their channel mean for grayscale): the one table the shard
# stream, aimkern.train's ImageFolder transform and aimkern.eval's transform all use.
MEAN_STD = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.449,), (0.226,))}

Box = Tuple[float, float, float, float]  # left, top, right, bottom in source pixels
View = Callable[[int, int], Tuple[Box, bool]]  # (width, height) of the stored image -> (crop box, flip)


def pixel_affine(in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(scale, shift), C floats each, with ``x * scale[c] + shift[c] == (x / 255 - mean[c]) / std[c]`` for the
    uint8 value x of channel c: ``scale = 1 / (255 std)`` and ``shift = -mean / std``, computed in float64 and
    rounded once to float32 (the values are float32 numbers, held as Python floats).

    The one definition of the model's input normalization: ``aimkern.data.inputs.model_input`` (the dense
    batch, one elementwise pass) and the packed model (normalization fused into ``aimkern.patch_embed``'s
    kernels, ``input_scale`` / ``input_shift``) both take these numbers, so both paths see the same float32
    affine."""
    check_channels(in_chans)
    mean, std = MEAN_STD[in_chans]
    # Python floats are float64 (IEEE, as torch's float64); struct's "f" rounds to nearest float32 as
    # Tensor.to(torch.float32) does. No tensor: torch.compile traces this as constants.
    to32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    return (tuple(to32(1.0 / (255.0 * s)) for s in std), tuple(to32(-m / s) for m, s in zip(mean, std)))


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


def center_view(img_size: int, crop_ratio: float) -> View:
    """The evaluation view: torchvision's Resize(round(img_size / crop_ratio)) + CenterCrop(img_size) as a box
    in stored pixels (rounded to whole pixels), never flipped."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    short_side = int(round(img_size / crop_ratio))

    def view(width: int, height: int) -> Tuple[Box, bool]:
        # Resize's output size (torchvision: the long side is truncated) and CenterCrop's offsets there.
        if width <= height:
            new_w, new_h = short_side, int(short_side * height / width)
        else:
            new_w, new_h = int(short_side * width / height), short_side
        sx, sy = width / new_w, height / new_h
        left, top = int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0))
        box = (round(left * sx), round(top * sy), round((left + img_size) * sx), round((top + img_size) * sy))
        return tuple(float(v) for v in box), False

    return view


def _pixel_box(box: Box, sx: float, sy: float, w: int, h: int) -> PixelBox:
    """A box in stored pixels -> whole pixels of an image decoded at scale (sx, sy), clamped and non-empty."""
    left, top = min(int(round(box[0] * sx)), w - 1), min(int(round(box[1] * sy)), h - 1)
    right, bottom = int(round(box[2] * sx)), int(round(box[3] * sy))
    return max(left, 0), max(top, 0), min(max(right, left + 1), w), min(max(bottom, top + 1), h)


def _decode_jpeg(data: bytes, view: View, img_size: int, gray: bool, scaled: bool):
    """libjpeg-turbo's path: (pixels, box in their pixels, flip), or None when it refuses the stream."""
    try:
        width, height = jpeg.jpeg_size(data)
    except ValueError:
        return None
    box, flip = view(width, height)
    d = jpeg.dct_denominator(box[2] - box[0], box[3] - box[1], img_size, img_size) if scaled else 1
    try:
        pixels = jpeg.decode(data, gray, d, (width, height))
    except ValueError:
        return None
    h, w = pixels.shape[:2]
    return pixels, _pixel_box(box, w / width, h / height, w, h), flip


def _decode_pil(data: bytes, view: View, in_chans: int):
    """PIL's path (PNG, WebP, ... and JPEGs libjpeg-turbo refused): full-size pixels, box, flip."""
    return pil_pixels(open_image(data), view, in_chans)


def pil_pixels(im, view: View, in_chans: int):
    """A PIL image -> (uint8 (h, w, in_chans) pixels, ``view``'s box in whole pixels, flip), for crop_resize."""
    box, flip = view(*im.size)
    mode = pil_mode(in_chans)
    if im.mode != mode:
        im = im.convert(mode)
    pixels = np.array(im)  # a writable copy (torch refuses to wrap PIL's read-only buffer)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    h, w = pixels.shape[:2]
    return pixels, _pixel_box(box, 1.0, 1.0, w, h), flip


def decode_view(data: bytes, view: View, img_size: int, in_chans: int, scaled: bool = True) -> torch.Tensor:
    """Encoded image -> uint8 (in_chans, img_size, img_size): ``view``'s box resized, flipped when it says so.

    Args:
        data: the encoded file (JPEG through libjpeg-turbo; anything else through PIL).
        view: (stored width, height) -> (box in stored pixels, flip); ``augmentation`` or ``center_view``.
        scaled: decode JPEGs at the smallest DCT scale that covers the output (False: always full size).
    Raises PIL's error (OSError, ...) for bytes neither decoder reads: the bad-sample rule's signal.
    """
    check_channels(in_chans)
    decoded = _decode_jpeg(data, view, img_size, in_chans == 1, scaled) if jpeg.is_jpeg(data) else None
    pixels, box, flip = decoded if decoded is not None else _decode_pil(data, view, in_chans)
    return crop_resize(pixels, box, img_size, flip)


def decode_crop(data: bytes, img_size: int, in_chans: int, seed: int, draft: bool = True) -> torch.Tensor:
    """Encoded image -> uint8 (in_chans, img_size, img_size): seeded random-resized crop, bicubic, flip.
    ``draft``: DCT-scaled JPEG decode (the name of PIL's draft mode, which this replaces)."""
    return decode_view(data, lambda w, h: augmentation(w, h, seed), img_size, in_chans, scaled=draft)


def normalize(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> float32, /255 then ImageNet mean / std (as ToTensor + Normalize)."""
    mean, std = (torch.tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1) for v in MEAN_STD[in_chans])
    return images.float().sub_(mean * 255).div_(std * 255)  # 2 passes; the step uses model_input
