"""Plain-PyTorch reference of `aimkern.patch_embed`."""
from __future__ import annotations

from typing import Optional

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


def patch_embed_reference(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Patch embedding as one GEMM: patchify(images) @ weight.view(E, C*P*P)^T + bias + pos_embed -> (B, N, E).

    Equal to ``conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed``.
    """
    e, _, p, _ = weight.shape
    x = patchify(images, p, order="cpq")
    out = torch.nn.functional.linear(x, weight.reshape(e, -1), bias)
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, -1, e).to(out.dtype)
    return out
