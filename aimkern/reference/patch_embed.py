"""Plain-PyTorch reference of `aimkern.patch_embed`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def patchify(images: torch.Tensor, patch_size: int, order: str = "cpq") -> torch.Tensor:
    """Cut (B, C, H, W) images into (B, N, C*P*P) patches in raster order.

    ``order`` is the order of the P*P*C values inside a patch: "cpq" is nn.Conv2d's weight layout
    (channel, row, column); "pqc" is MAE/AIM's target layout (row, column, channel).
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    if order == "cpq":
        x = torch.einsum("nchpwq->nhwcpq", x)
    elif order == "pqc":
        x = torch.einsum("nchpwq->nhwpqc", x)
    else:
        raise ValueError(f"patchify: order must be 'cpq' or 'pqc', got {order!r}")
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def normalized_images(images: torch.Tensor, input_scale, input_shift, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, C, H, W) -> ``x * scale[c] + shift[c]`` in ``dtype``: scale and shift (C floats each) rounded
    to float32, the multiply-add in fp32 (in float64 when ``dtype`` is float64: the ground truth), then cast."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = (torch.tensor(v, dtype=torch.float32).to(device=images.device, dtype=compute).view(1, -1, 1, 1)
                    for v in (input_scale, input_shift))
    return (images.to(compute) * scale + shift).to(dtype)


def patch_embed_reference(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    input_scale: Optional[Tuple[float, ...]] = None,
    input_shift: Optional[Tuple[float, ...]] = None,
) -> torch.Tensor:
    """Patch embedding as one GEMM: patchify(images) @ weight.view(E, C*P*P)^T + bias + pos_embed -> (B, N, E).

    Equal to ``conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed``. uint8 images
    are first normalized per channel (``normalized_images``, into the weight's dtype) when ``input_scale`` /
    ``input_shift`` are given.
    """
    e, _, p, _ = weight.shape
    if input_scale is not None:
        images = normalized_images(images, input_scale, input_shift, weight.dtype)
    x = patchify(images, p, order="cpq")
    out = torch.nn.functional.linear(x, weight.reshape(e, -1), bias)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, -1, e).to(out.dtype)
    return out
