"""`aimkern.patch_embed`: patchify + linear projection + bias + position embedding, raster order.

Backend dispatch and input checks live here; the Triton launcher, autograd and custom-op registration
join this file when the kernel lands (kernels/patch_embed.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.patch_embed import patch_embed_reference
from ._checks import check_float_dtype, check_same_device, check_tensor, resolve_backend

OP = "patch_embed"


def _check_inputs(images, weight, bias, pos_embed, backend: str) -> None:
    check_tensor(images, "images", OP, ndim=4)
    check_tensor(weight, "weight", OP, ndim=4)
    b, c, h, w = images.shape
    e, wc, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"{OP}: weight must be (E, C, P, P) with square patches, got {tuple(weight.shape)}")
    if wc != c:
        raise ValueError(f"{OP}: weight has {wc} input channels but images have C={c}")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{OP}: image height and width must be positive multiples of P={p}, got H={h}, W={w}")
    n = (h // p) * (w // p)
    if bias is not None:
        check_tensor(bias, "bias", OP, ndim=1)
        if bias.shape != (e,):
            raise ValueError(f"{OP}: bias must have shape (E,) = ({e},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        check_tensor(pos_embed, "pos_embed", OP)
        if tuple(pos_embed.shape) not in ((n, e), (1, n, e)):
            raise ValueError(f"{OP}: pos_embed must have shape (N, E) or (1, N, E) = (1, {n}, {e}), got {tuple(pos_embed.shape)}")
    check_same_device((("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)), OP)
    for name, t in (("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        if t is not None:
            check_float_dtype(t, name, OP, backend)


def _patch_embed_triton(images, weight, bias, pos_embed) -> torch.Tensor:
    raise NotImplementedError(
        "aimkern.patch_embed: the Triton kernel has not landed yet; use backend='reference' (or 'auto' on CPU)"
    )


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused patch embedding, equal to ``conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos_embed``.

    Args:
        images: (B, C, H, W), H and W multiples of P.
        weight: (E, C, P, P), exactly ``nn.Conv2d(C, E, P, stride=P).weight``.
        bias: (E,) or None.
        pos_embed: (N, E) or (1, N, E) with N = (H // P) * (W // P), or None.
        backend: "auto" (Triton on CUDA, reference on CPU), "triton" or "reference".

    Returns:
        (B, N, E) tokens in raster order, in the dtype of ``images @ weight``.
    """
    check_tensor(images, "images", OP)
    be = resolve_backend(backend, images, OP)
    _check_inputs(images, weight, bias, pos_embed, be)
    if be == "reference":
        return patch_embed_reference(images, weight, bias, pos_embed)
    return _patch_embed_triton(images, weight, bias, pos_embed)
