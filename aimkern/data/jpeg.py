"""JPEG decode with libjpeg-turbo (through ``simplejpeg``), at the smallest DCT scale a crop allows.

libjpeg-turbo can run its inverse DCT at 1/2, 1/4 or 1/8 of the stored size: each 8x8 block becomes a
4x4, 2x2 or 1x1 block, so the decode cost falls with the scale. ``dct_denominator`` picks the largest
denominator d in (1, 2, 4, 8) at which the crop box, scaled by 1/d, still covers at least the output size
in both directions (the output is never upsampled because of the scale); ``decode`` runs it.

Only power-of-two scales are used: libjpeg-turbo's other M/8 scales run a slower IDCT, and the power-of-two
ones are what FFCV and DALI use. The scaled image is ``ceil(W / d) x ceil(H / d)`` (libjpeg's rounding); the
caller maps its box with the decoded array's real size, never with 1/d.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

DENOMINATORS = (1, 2, 4, 8)
_SOI = b"\xff\xd8\xff"  # start of image + the next marker's 0xff: every JPEG (JFIF, EXIF, raw) begins so


def is_jpeg(data: bytes) -> bool:
    """True when ``data`` starts like a JPEG (the decision to try libjpeg-turbo before PIL)."""
    return bytes(data[:3]) == _SOI


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of a JPEG from its header alone (no pixels decoded). Raises ValueError on a bad header."""
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return int(width), int(height)


def dct_denominator(box_w: float, box_h: float, out_w: int, out_h: int) -> int:
    """The largest d in (1, 2, 4, 8) with box_w / d >= out_w and box_h / d >= out_h (1 when none is larger).

    Args:
        box_w, box_h: the crop's size in stored (full-resolution) pixels, > 0.
        out_w, out_h: the output size in pixels, >= 1.
    """
    if not (box_w > 0 and box_h > 0):
        raise ValueError(f"box_w and box_h must be > 0, got {box_w}, {box_h}")
    if out_w < 1 or out_h < 1:
        raise ValueError(f"out_w and out_h must be >= 1, got {out_w}, {out_h}")
    best = 1
    for d in DENOMINATORS[1:]:
        # Strictly by the box's extent: a scale whose box is a pixel short would upsample, and blur.
        if box_w / d >= out_w and box_h / d >= out_h:
            best = d
    return best


def decode(data: bytes, gray: bool, denominator: int = 1, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A JPEG -> uint8 (h, w, 3) RGB or (h, w, 1) gray array, decoded at 1/``denominator`` of its stored size.

    ``size``: the stored (width, height) when the caller has read the header already. Raises ValueError
    (simplejpeg's error for a broken or unsupported stream, e.g. CMYK to RGB; the caller falls back to PIL).
    Uses libjpeg-turbo's accurate integer IDCT and fancy upsampling, the defaults (PIL's too): the fast
    variants save 4-5 % each and move pixels by more than resampling round-off (measured: a mean of 1.0 and
    1.5 grey levels, up to 16 at chroma edges).
    """
    import simplejpeg

    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator}")
    colorspace = "GRAY" if gray else "RGB"
    if denominator == 1:
        arr = simplejpeg.decode_jpeg(data, colorspace=colorspace)
    else:
        # simplejpeg scales to the smallest of libjpeg's M/8 sizes that is >= (min_width, min_height); asking
        # for ceil(W / d) x ceil(H / d) selects exactly M = 8 / d (its min_factor alone does not scale).
        width, height = size or jpeg_size(data)
        arr = simplejpeg.decode_jpeg(data, colorspace=colorspace, min_width=-(-width // denominator),
                                     min_height=-(-height // denominator))
    return arr if arr.ndim == 3 else arr[:, :, None]
