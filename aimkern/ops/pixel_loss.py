"""`aimkern.next_patch_pixel_loss`: AIM's normalized next-patch pixel regression, fused.

Backend dispatch and input checks live here; the Triton launcher, autograd and custom-op registration
join this file when the kernel lands (kernels/pixel_loss.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..reference.pixel_loss import next_patch_pixel_loss_reference
from ._checks import check_float_dtype, check_same_device, check_tensor, normalize_prefix_len, resolve_backend

OP = "next_patch_pixel_loss"


@dataclass(frozen=True)
class PixelLossParams:
    """Non-tensor options of one next_patch_pixel_loss call."""

    patch_size: int  # P: patches are P x P pixels, C channels
    offset: int = 1  # row i of pred predicts patch i + offset (block_size of the causal mask)
    norm_pix: bool = True  # standardize each target patch with its mean and unbiased variance
    eps: float = 1e-6  # added to the variance before the square root


def _check_inputs(pred, images, params: PixelLossParams, backend: str) -> None:
    check_tensor(pred, "pred", OP, ndim=3)
    check_tensor(images, "images", OP, ndim=4)
    p = params.patch_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{OP}: patch_size must be an int >= 1, got {p!r}")
    if isinstance(params.offset, bool) or not isinstance(params.offset, int) or params.offset < 0:
        raise ValueError(f"{OP}: offset must be an int >= 0, got {params.offset!r}")
    if not isinstance(params.norm_pix, bool):
        raise TypeError(f"{OP}: norm_pix must be a bool, got {type(params.norm_pix).__name__}")
    if not params.eps >= 0.0:
        raise ValueError(f"{OP}: eps must be >= 0, got {params.eps}")
    b, c, h, w = images.shape
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{OP}: image height and width must be positive multiples of patch_size={p}, got H={h}, W={w}")
    n = (h // p) * (w // p)
    if tuple(pred.shape) != (b, n, p * p * c):
        raise ValueError(f"{OP}: pred must have shape (B, N, P*P*C) = ({b}, {n}, {p * p * c}), got {tuple(pred.shape)}")
    if params.norm_pix and p * p * c < 2:
        raise ValueError(f"{OP}: norm_pix needs at least 2 values per patch (P*P*C >= 2) for the unbiased variance")
    check_same_device((("pred", pred), ("images", images)), OP)
    check_float_dtype(pred, "pred", OP, backend)
    check_float_dtype(images, "images", OP, backend)


def _pixel_loss_triton(pred, images, prefix_len: Optional[torch.Tensor], params: PixelLossParams) -> torch.Tensor:
    raise NotImplementedError(
        "aimkern.next_patch_pixel_loss: the Triton kernel has not landed yet; use backend='reference' "
        "(or 'auto' on CPU)"
    )


def next_patch_pixel_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    *,
    patch_size: int,
    offset: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """AIM's next-patch objective: MSE between pred row i and the (normalized) patch i + offset.

    Args:
        pred: (B, N, P*P*C) predictions, values in MAE/AIM (p, q, c) order.
        images: (B, C, H, W), H and W multiples of patch_size; N = (H // P) * (W // P).
        offset: row i predicts patch i + offset.
        prefix_len: None, an int or an int tensor (B,) in [0, N]: patches j < prefix_len[b] are context,
            not targets.
        norm_pix: standardize each target patch by its mean and unbiased variance (with eps).

    Returns:
        float32 scalar (float64 for float64 inputs): the per-value squared error averaged within each
        patch, then over the counted targets (j >= offset and j >= prefix_len[b]); 0 when none counts.
    """
    params = PixelLossParams(patch_size=patch_size, offset=offset, norm_pix=norm_pix, eps=float(eps))
    check_tensor(pred, "pred", OP)
    be = resolve_backend(backend, pred, OP)
    _check_inputs(pred, images, params, be)
    prefix = normalize_prefix_len(prefix_len, pred.shape[0], pred.shape[1], pred.device, OP)
    if be == "reference":
        return next_patch_pixel_loss_reference(
            pred, images, patch_size=patch_size, offset=offset, prefix_len=prefix, norm_pix=norm_pix, eps=eps
        )
    return _pixel_loss_triton(pred, images, prefix, params)
