"""The Triton path of ``aimkern.next_patch_pixel_loss_varlen``: the packed next-patch pixel regression, fused.

The launcher (kernels/pixel_loss_varlen.py), its custom ops (``aimkern::next_patch_pixel_loss_varlen_fwd`` /
``_bwd``; typed arguments: ops/_custom_op.py), the autograd formula and the entry ``pixel_loss_varlen_triton``.
Forward and backward each read pred and patches once; the backward writes

    d(pred)[i] = 2 * grad * (pred[i] - t[i + offset]) / (D * count)   when target i + offset counts,
                 0 otherwise,

with the normalized targets t recomputed in registers. The patches are data (no gradient). The count of
counted targets is computed on the device from cu_seqlens and prefix_len (no host read).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._channel_affine import device_affine
from ._custom_op import TypedOp
from ._launch import LaunchPolicy, cdiv, current_policy, fixed_config, kernels, launch

OP = "next_patch_pixel_loss_varlen"


@dataclass(frozen=True)
class PixelLossVarlenParams:
    """The options of one next_patch_pixel_loss_varlen call (the public keyword arguments, one field each)."""

    offset: int = 1  # row i of a sequence predicts its patch i + offset
    norm_pix: bool = True  # standardize each target patch with its mean and unbiased variance
    eps: float = 1e-6  # added to the variance before the square root
    # A host bound on the images' lengths; given, the op reads nothing on the host (cu_seqlens' values are
    # the caller's promise). Only the checks use it: the spec drops it before dispatch and the kernels.
    max_seqlen: Optional[int] = None
    # uint8 patches only: the targets are x * input_scale[c] + input_shift[c] (C floats each, fp32) before
    # norm_pix, the model's input normalization applied in the kernel (no normalized copy of the pack).
    input_scale: Optional[Tuple[float, ...]] = None
    input_shift: Optional[Tuple[float, ...]] = None


def counted_total(cu_seqlens: torch.Tensor, prefix_len: Optional[torch.Tensor], offset: int) -> torch.Tensor:
    """fp32 0-d: the targets of the pack that count, sum_s max(0, n_s - max(offset, prefix_len[s]))."""
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    first = torch.full_like(n, offset)
    if prefix_len is not None:
        first = torch.maximum(first, prefix_len.to(torch.int64))
    return (n - first).clamp_min(0).sum().to(torch.float32)


# ------------------------------------------------------------------------------------------ launchers
def _launch(pred, patches, cu, prefix, scale, params: PixelLossVarlenParams, policy: LaunchPolicy, backward: bool):
    t, d = pred.shape
    kern = kernels("pixel_loss_varlen")
    choice = kern.loss(t, d)
    blocks = cdiv(t, fixed_config(choice, policy).kwargs["BLOCK_R"])
    if backward:
        out = torch.empty((t, d), device=pred.device, dtype=pred.dtype)
    else:
        out = torch.empty((blocks,), device=pred.device, dtype=torch.float32)
    if t == 0:
        return out
    s = cu.numel() - 1
    in_scale, in_shift = device_affine(params.input_scale, params.input_shift, pred.device, out)
    launch(
        choice, lambda META: (blocks,),
        (pred, patches, cu, prefix if prefix is not None else cu, scale if scale is not None else out, in_scale,
         in_shift, out, t, s, kern.search_steps(s), params.offset, d, len(params.input_scale or (1,)), params.eps,
         *pred.stride(), *patches.stride(), prefix.stride(0) if prefix is not None else 0),
        dtype=pred.dtype, policy=policy, HAS_PREFIX=prefix is not None, NORM_PIX=params.norm_pix,
        BACKWARD=backward, AFFINE=params.input_scale is not None,
    )
    return out


def launch_forward(pred, patches, cu_seqlens, prefix, params: PixelLossVarlenParams,
                   policy: LaunchPolicy) -> torch.Tensor:
    """pred (T, D), patches (T, D) uint8 / float, any strides, cu_seqlens int32 (S + 1,), prefix None or
    int32 (S,) -> (row blocks,) fp32 partial sums of the per-patch mean squared errors of counted targets."""
    return _launch(pred, patches, cu_seqlens, prefix, None, params, policy, backward=False)


def launch_backward(pred, patches, cu_seqlens, prefix, scale: torch.Tensor, params: PixelLossVarlenParams,
                    policy: LaunchPolicy) -> torch.Tensor:
    """d(pred) (T, D) in pred's dtype, for ``scale`` (1,) fp32 = d(loss) * 2 / (D * count)."""
    return _launch(pred, patches, cu_seqlens, prefix, scale, params, policy, backward=True)


# ------------------------------------------------------------------------------ custom ops + autograd
_SCALARS = (PixelLossVarlenParams, ("autotune", bool))


def _fwd(pred, patches, cu, prefix, params, autotune) -> torch.Tensor:
    partials = launch_forward(pred, patches, cu, prefix, params, LaunchPolicy(autotune=autotune))
    return partials.sum() / counted_total(cu, prefix, params.offset).clamp_min(1.0)


def _fwd_fake(pred, patches, cu, prefix, params, autotune):
    return pred.new_empty((), dtype=torch.float32)


def _bwd(grad, pred, patches, cu, prefix, params, autotune) -> torch.Tensor:
    count = counted_total(cu, prefix, params.offset).clamp_min(1.0)
    scale = (grad.to(torch.float32) * 2.0 / (pred.shape[1] * count)).reshape(1)
    return launch_backward(pred, patches, cu, prefix, scale, params, LaunchPolicy(autotune=autotune))


def _bwd_fake(grad, pred, patches, cu, prefix, params, autotune):
    return torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)


pixel_loss_varlen_fwd = TypedOp("next_patch_pixel_loss_varlen_fwd", ("pred", "patches", "cu_seqlens", "prefix?"),
                                _SCALARS, "Tensor", _fwd, _fwd_fake)
pixel_loss_varlen_bwd = TypedOp("next_patch_pixel_loss_varlen_bwd",
                                ("grad", "pred", "patches", "cu_seqlens", "prefix?"), _SCALARS, "Tensor", _bwd,
                                _bwd_fake)


def _setup_context(ctx, pred, patches, cu, prefix, params, autotune, output):
    ctx.save_for_backward(pred, patches, cu, prefix)
    ctx.scalars = (params, autotune)


def _backward(ctx, grad):
    pred, patches, cu, prefix = ctx.saved_tensors
    dpred = pixel_loss_varlen_bwd(grad, pred, patches, cu, prefix, *ctx.scalars) if ctx.needs_input_grad[0] else None
    return dpred, None, None, None  # pred, patches (data), cu_seqlens, prefix


pixel_loss_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def pixel_loss_varlen_triton(pred, patches, cu_seqlens, prefix_len: Optional[torch.Tensor],
                             params: PixelLossVarlenParams) -> torch.Tensor:
    """The Triton path on checked inputs: pred (T, D) float, patches (T, D) uint8 / float that need no
    gradient, cu_seqlens int32 (S + 1,), prefix_len None or int32 (S,)."""
    if patches.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{OP}: backend='triton' treats patches as data and gives them no gradient, but "
                         "patches.requires_grad is True; detach them, or use backend='reference'")
    # cu_seqlens at stride 1 (the kernel's binary search indexes it); prefix_len is read through its stride
    return pixel_loss_varlen_fwd(pred, patches, cu_seqlens.contiguous(), prefix_len, params, current_policy().autotune)
