"""Plain-PyTorch reference of the packed next-patch pixel loss (``next_patch_pixel_loss_varlen``).

pred and patches are (T, P*P*C): the tokens of S sequences (images) laid end to end, sequence s holding
tokens [cu_seqlens[s], cu_seqlens[s + 1]). Row i of a sequence's pred predicts that sequence's patch
i + offset; target j of a sequence counts when j >= offset and j >= its prefix_len, so no prediction ever
crosses into another sequence. The loss is the mean, over the counted targets of the whole pack, of the
per-patch mean squared error: each image weighs by its number of targets, as the dense loss does within a
batch. Patch values are normalized per patch exactly as the dense loss does (``normalize_patches``).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .attention_varlen import per_sequence, sequence_bounds
from .pixel_loss import counted_error_sum, normalize_patches
from .targets import target_mask


def next_patch_pixel_loss_varlen_reference(
    pred: torch.Tensor,
    patches: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    offset: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
    input_scale: Optional[Tuple[float, ...]] = None,
    input_shift: Optional[Tuple[float, ...]] = None,
) -> torch.Tensor:
    """pred (T, P*P*C) float, patches (T, P*P*C) raw patch values in (p, q, c) order (uint8 or float, as
    ``aimkern.data.packing.pack_images`` makes them), cu_seqlens (S + 1,), prefix_len None, an int or (S,).
    input_scale, input_shift: None, or C floats each: target value x of channel c (value d of a patch is
    channel d % C) is first ``x * input_scale[c] + input_shift[c]``, both rounded to float32, computed in
    fp32 (float64 when pred is float64: the ground truth), before the per-patch standardization.

    Returns a 0-dim float32 (float64 for float64 patches). When no target counts the loss is 0 with a
    zero gradient.
    """
    if pred.shape != patches.shape or pred.dim() != 2:
        raise ValueError(f"pred and patches must both be (T, P*P*C), got {tuple(pred.shape)} and "
                         f"{tuple(patches.shape)}")
    bounds = sequence_bounds(cu_seqlens)
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != pred.shape[0] or any(b < a for a, b in bounds):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={pred.shape[0]}, got {cu_seqlens.tolist()}")
    prefixes = per_sequence(prefix_len, len(bounds), "prefix_len")
    if input_scale is not None:
        compute = torch.float64 if pred.dtype == torch.float64 else torch.float32
        scale, shift = (torch.tensor(v, dtype=torch.float32).to(device=patches.device, dtype=compute)
                        for v in (input_scale, input_shift))
        patches = (patches.to(compute).reshape(patches.shape[0], -1, scale.numel()) * scale + shift).reshape(
            patches.shape)
    target = normalize_patches(patches, norm_pix, eps)
    total = target.new_zeros(())
    count = target.new_zeros(())
    for s, (a, b) in enumerate(bounds):
        prefix = None if prefixes is None else torch.tensor([prefixes[s]], device=pred.device)
        counted = target_mask(1, b - a, offset, prefix, pred.device)
        seq_total, seq_count = counted_error_sum(pred[None, a:b], target[None, a:b], counted, offset)
        total = total + seq_total
        count = count + seq_count
    return total / count.clamp_min(1.0)
