"""The Triton path of ``aimkern.next_patch_pixel_loss``: AIM's normalized next-patch pixel regression, fused.

The Triton launcher (kernels/pixel_loss.py), its custom ops (``aimkern::next_patch_pixel_loss_fwd`` /
``_bwd``; typed arguments: ops/_custom_op.py), the autograd formula and the entry ``pixel_loss_triton``.
The Triton path reads pred and images once in the forward and once in the backward, which writes d(pred)
directly:

    d(pred)[b, i] = 2 * grad * (pred[b, i] - t[b, i + offset]) / (P*P*C * count)   for counted targets,
                    0 for rows that predict nothing counted,

recomputing the normalized targets t in registers (never stored). The images are data: the Triton path
gives them no gradient and refuses images that require grad (the reference does differentiate through
the targets' normalization).

Public launcher entry points (the custom ops run them; the compile gate drives them on meta tensors):
``launch_forward`` and ``launch_backward``. Also the loss's bookkeeping for its callers (``target_count``,
``patch_targets``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference.pixel_loss import counted_targets
from ._custom_op import TypedOp
from ._launch import LaunchPolicy, cdiv, current_policy, fixed_config, kernels, launch

OP = "next_patch_pixel_loss"


@dataclass(frozen=True)
class PixelLossParams:
    """The options of one next_patch_pixel_loss call (the public keyword arguments, one field each)."""

    patch_size: int  # P: patches are P x P pixels, C channels
    offset: int = 1  # row i of pred predicts patch i + offset (block_size of the causal mask)
    norm_pix: bool = True  # standardize each target patch with its mean and unbiased variance
    eps: float = 1e-6  # added to the variance before the square root


def _count(prefix: Optional[torch.Tensor], batch: int, n: int, offset: int, device) -> torch.Tensor:
    """Number of counted targets of the batch, as an fp32 scalar tensor."""
    return counted_targets(batch, n, offset, prefix, device).sum().to(torch.float32)


# ------------------------------------------------------------------------------------------ launchers
# The public launcher entry points: what the custom ops run, and what the compile gate
# (benchmarks/kernel_problems.py) drives on meta tensors.
def _launch(pred, images, prefix, scale, params: PixelLossParams, policy: LaunchPolicy, backward: bool):
    b, n, d = pred.shape
    p = params.patch_size
    c = images.shape[1]
    choice = kernels("pixel_loss").loss(n, d)
    r_blocks = cdiv(n, fixed_config(choice, policy).kwargs["BLOCK_R"])
    if backward:
        out = torch.empty((b, n, d), device=pred.device, dtype=pred.dtype)
    else:
        out = torch.empty((b * r_blocks,), device=pred.device, dtype=torch.float32)
    if b * n == 0:
        return out
    launch(
        choice, lambda META: (b * r_blocks,),
        (pred, images, prefix if prefix is not None else out, scale if scale is not None else out, out,
         n, images.shape[3] // p, params.offset, d, r_blocks, params.eps,
         *pred.stride(), *images.stride(), prefix.stride(0) if prefix is not None else 0),
        dtype=pred.dtype, policy=policy,
        P=p, C=c, HAS_PREFIX=prefix is not None, NORM_PIX=params.norm_pix, BACKWARD=backward,
    )
    return out


def launch_forward(pred, images, prefix: Optional[torch.Tensor], params: PixelLossParams,
                   policy: LaunchPolicy) -> torch.Tensor:
    """pred (B, N, D), images (B, C, H, W), prefix None or int32 (B,), any strides ->
    (B * row blocks,) fp32 partial sums of the per-patch mean squared errors of the counted targets."""
    return _launch(pred, images, prefix, None, params, policy, backward=False)


def launch_backward(pred, images, prefix: Optional[torch.Tensor], scale: torch.Tensor, params: PixelLossParams,
                    policy: LaunchPolicy) -> torch.Tensor:
    """d(pred) (B, N, D) in pred's dtype, for ``scale`` (1,) fp32 = d(loss) * 2 / (D * count)."""
    return _launch(pred, images, prefix, scale, params, policy, backward=True)


# ------------------------------------------------------------------------------ custom ops + autograd
# Scalars (ops/_custom_op.py): the call's PixelLossParams whole, and the autotune choice of the LaunchPolicy
# current at the forward (the backward gets it too).
_SCALARS = (PixelLossParams, ("autotune", bool))


def _fwd(pred, images, prefix, params: PixelLossParams, autotune: bool) -> torch.Tensor:
    """-> the loss, a 0-d fp32 tensor (0 when no target counts)."""
    b, n, _ = pred.shape
    partials = launch_forward(pred, images, prefix, params, LaunchPolicy(autotune=autotune))
    return partials.sum() / _count(prefix, b, n, params.offset, pred.device).clamp_min(1.0)


def _fwd_fake(pred, images, prefix, params, autotune):
    return pred.new_empty((), dtype=torch.float32)


def _bwd(grad, pred, images, prefix, params: PixelLossParams, autotune: bool) -> torch.Tensor:
    """grad 0-d -> d(pred) like pred."""
    b, n, d = pred.shape
    count = _count(prefix, b, n, params.offset, pred.device).clamp_min(1.0)
    scale = (grad.to(torch.float32) * 2.0 / (d * count)).reshape(1)  # d/dpred of mean_d (pred - t)^2 / count
    return launch_backward(pred, images, prefix, scale, params, LaunchPolicy(autotune=autotune))


def _bwd_fake(grad, pred, images, prefix, params, autotune):
    return torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)


pixel_loss_fwd = TypedOp("next_patch_pixel_loss_fwd", ("pred", "images", "prefix?"), _SCALARS, "Tensor",
                         _fwd, _fwd_fake)
pixel_loss_bwd = TypedOp("next_patch_pixel_loss_bwd", ("grad", "pred", "images", "prefix?"), _SCALARS, "Tensor",
                         _bwd, _bwd_fake)


def _setup_context(ctx, pred, images, prefix, params, autotune, output):
    ctx.save_for_backward(pred, images, prefix)
    ctx.scalars = (params, autotune)


def _backward(ctx, grad):
    pred, images, prefix = ctx.saved_tensors
    dpred = pixel_loss_bwd(grad, pred, images, prefix, *ctx.scalars) if ctx.needs_input_grad[0] else None
    # The images are data: no gradient flows to them through this op (the caller refuses images that
    # require grad; see pixel_loss_triton).
    return dpred, None, None  # pred, images, prefix


pixel_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def images_need_grad(images: torch.Tensor) -> bool:
    """Whether autograd would want a gradient of ``images``, which the Triton path does not give."""
    return images.requires_grad and torch.is_grad_enabled()


def pixel_loss_triton(pred, images, prefix_len: Optional[torch.Tensor], params: PixelLossParams) -> torch.Tensor:
    """The Triton path on checked inputs (pred (B, N, D), images (B, C, H, W), prefix_len None or int32 (B,))."""
    if images_need_grad(images):
        raise ValueError(
            f"{OP}: backend='triton' treats images as data and gives them no gradient, but images.requires_grad "
            "is True; detach the images, or use backend='reference' (which differentiates through the targets)"
        )
    return pixel_loss_fwd(pred, images, prefix_len, params, current_policy().autotune)


# ------------------------------------------------------------------- the loss's bookkeeping, for its callers
# The train loop weights each rank's loss by its share of counted targets, and the token objective's
# tokenizer clusters the very targets this loss regresses. They take both from here, the op they pair with,
# so code that runs the op never reaches into aimkern.reference (which stays the definition the tests and
# the CPU fallback use).
def target_count(batch: int, n: int, offset: int = 1, prefix_len: Optional[torch.Tensor] = None,
                 device=None) -> torch.Tensor:
    """(B,) int64: the targets of each image that ``next_patch_pixel_loss`` averages over,
    #{j < N : j >= offset and j >= prefix_len[b]} (0 when none counts, where the loss is 0)."""
    return counted_targets(batch, n, offset, prefix_len, device)


def patch_targets(images: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C) float32 (float64 for float64 images): the targets
    ``next_patch_pixel_loss`` regresses, patches in raster order, values in (p, q, c) order, each patch
    standardized by its mean and unbiased variance when ``norm_pix``."""
    from ..reference.pixel_loss import pixel_targets  # the definition; the Triton kernel recomputes it in registers

    return pixel_targets(images, patch_size, norm_pix, eps)
