"""Plain-PyTorch reference of `aimkern.linear_cross_entropy` (materializes the logits)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, W, b).float(), target, ...) + z_loss * logsumexp(logits)**2``.

    input (..., E), linear_weight (V, E), target (...). The z-loss term is averaged like the loss: per
    non-ignored token, then summed ("sum"), averaged over non-ignored tokens ("mean") or returned per token
    ("none", zero where ignored). Logits are computed in float32 (float64 for float64 inputs).
    Like F.cross_entropy, "mean" over a batch where every target is ignored is NaN (0 / 0).
    """
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy_reference: target must be an integer tensor of class ids, got "
                        f"{target.dtype} (a float would be truncated)")
    if input.shape[-1] < 1:
        raise ValueError("linear_cross_entropy_reference: input's last dimension E must be >= 1")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(
                f"linear_cross_entropy_reference: {name} must have input's dtype {input.dtype}, got {t.dtype}"
            )
    logits = F.linear(input, linear_weight, linear_bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, linear_weight.shape[0])
    flat_target = target.reshape(-1).long()  # F.cross_entropy wants int64 class ids
    loss = F.cross_entropy(
        logits, flat_target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    keep = flat_target != ignore_index
    if z_loss != 0.0:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * torch.where(keep, lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()
