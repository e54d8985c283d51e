"""Plain-PyTorch reference of `aimkern.next_patch_pixel_loss` (AIM's normalized next-patch objective)."""
from __future__ import annotations

from typing import Optional

import torch

from .patch_embed import patchify
from .targets import counted_targets, target_mask  # noqa: F401  (aimkern.ops.pixel_loss imports them from here)


def normalize_patches(patches: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(..., P*P*C) patch values (any dtype, uint8 included) -> float32 (float64 stays float64), each patch
    standardized with its mean and unbiased variance when norm_pix: (t - mean) / sqrt(var + eps)."""
    t = patches.to(torch.promote_types(patches.dtype, torch.float32))
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)  # unbiased, as in MAE and AIM
        t = (t - mean) / torch.sqrt(var + eps)
    return t


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C) targets in MAE/AIM (p, q, c) order, per-patch standardized when norm_pix."""
    return normalize_patches(patchify(images, patch_size, order="pqc"), norm_pix, eps)


def next_patch_pixel_loss_reference(
    pred: torch.Tensor,
    images: torch.Tensor,
    *,
    patch_size: int,
    offset: int = 1,
    prefix_len: Optional[torch.Tensor] = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error of pred[:, i] against the (normalized) patch i + offset, over counted targets.

    pred (B, N, P*P*C), images (B, C, H, W). Returns a float32 scalar (float64 for float64 inputs). When no
    target counts (e.g. prefix_len = N everywhere) the loss is 0 with a zero gradient.
    """
    b, n, _ = pred.shape
    target = pixel_targets(images, patch_size, norm_pix, eps)
    counted = target_mask(b, n, offset, prefix_len, pred.device)
    total, count = counted_error_sum(pred, target, counted, offset)
    return total / count.clamp_min(1.0)


def counted_error_sum(pred: torch.Tensor, target: torch.Tensor, counted: torch.Tensor, offset: int) -> tuple:
    """(sum over counted targets of the per-patch mean squared error, number of counted targets), both 0-dim
    in target's dtype, for pred and target (B, N, P*P*C) and counted (B, N) bool: row i of pred predicts
    target i + offset of the same row of the batch."""
    n = pred.shape[1]
    # Row i of pred predicts patch i + offset: shift the targets back by `offset` rows.
    shifted_target = target[:, offset:]
    shifted_pred = pred[:, : max(n - offset, 0)].to(target.dtype)
    per_patch = ((shifted_pred - shifted_target) ** 2).mean(dim=-1)
    weight = counted[:, offset:].to(per_patch.dtype)
    return (per_patch * weight).sum(), weight.sum()
