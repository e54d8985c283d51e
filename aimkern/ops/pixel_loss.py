"""`aimkern.next_patch_pixel_loss`: AIM's normalized next-patch pixel regression, fused.

Backend dispatch, input checks, the Triton launcher (kernels/pixel_loss.py), its custom-op registration
(``aimkern::next_patch_pixel_loss_fwd`` / ``_bwd``) and the autograd formula. The Triton path reads pred
and images once in the forward and once in the backward, which writes d(pred) directly:

    d(pred)[b, i] = 2 * grad * (pred[b, i] - t[b, i + offset]) / (P*P*C * count)   for counted targets,
                    0 for rows that predict nothing counted,

recomputing the normalized targets t in registers (never stored). The images are data: the Triton path
gives them no gradient and refuses images that require grad (the reference does differentiate through
the targets' normalization).

The custom ops take their non-tensor arguments as one str, the encoded ``PixelLossCall``
(``PixelLossParams`` whole and the forward's ``LaunchPolicy``; ops/_boundary.py). Public launcher entry
points (the custom ops run them; the compile gate drives them on meta tensors): ``launch_forward`` and
``launch_backward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..reference.pixel_loss import counted_targets, next_patch_pixel_loss_reference
from ._checks import (
    check_backend_name,
    check_float_dtype,
    measured_auto,
    run_dispatched,
    check_same_device,
    check_tensor,
    normalize_prefix_len,
    resolve_backend,
)
from ._boundary import crosses_boundary, decode, encode
from ._launch import LaunchPolicy, cdiv, current_policy, fixed_config, kernels, launch

OP = "next_patch_pixel_loss"


@crosses_boundary
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


def _count(prefix: Optional[torch.Tensor], batch: int, n: int, offset: int, device) -> torch.Tensor:
    """Number of counted targets of the batch, as an fp32 scalar tensor."""
    return counted_targets(batch, n, offset, prefix, device).sum().to(torch.float32)


# ------------------------------------------------------------------------------------------ launchers
# The public launcher entry points: what the custom ops run, and what the compile gate
# (aimkern/ops/specs/pixel_loss.py's gate problems) drives on meta tensors.
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
@crosses_boundary
@dataclass(frozen=True)
class PixelLossCall:
    """The non-tensor argument of the pixel-loss custom ops, encoded into one str (ops/_boundary.py):
    the call's PixelLossParams whole, and the LaunchPolicy current at the forward (the backward gets it too)."""

    params: PixelLossParams
    policy: LaunchPolicy


@torch.library.custom_op("aimkern::next_patch_pixel_loss_fwd", mutates_args=())
def _pixel_loss_fwd(pred: torch.Tensor, images: torch.Tensor, prefix: Optional[torch.Tensor], call: str) -> torch.Tensor:
    """-> the loss, a 0-d fp32 tensor (0 when no target counts)."""
    c = decode(call)
    b, n, _ = pred.shape
    partials = launch_forward(pred, images, prefix, c.params, c.policy)
    return partials.sum() / _count(prefix, b, n, c.params.offset, pred.device).clamp_min(1.0)


@_pixel_loss_fwd.register_fake
def _(pred, images, prefix, call):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("aimkern::next_patch_pixel_loss_bwd", mutates_args=())
def _pixel_loss_bwd(
    grad: torch.Tensor, pred: torch.Tensor, images: torch.Tensor, prefix: Optional[torch.Tensor], call: str,
) -> torch.Tensor:
    """grad 0-d -> d(pred) like pred."""
    c = decode(call)
    b, n, d = pred.shape
    count = _count(prefix, b, n, c.params.offset, pred.device).clamp_min(1.0)
    scale = (grad.to(torch.float32) * 2.0 / (d * count)).reshape(1)  # d/dpred of mean_d (pred - t)^2 / count
    return launch_backward(pred, images, prefix, scale, c.params, c.policy)


@_pixel_loss_bwd.register_fake
def _(grad, pred, images, prefix, call):
    return torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)


def _setup_context(ctx, inputs, output):
    pred, images, prefix, call = inputs
    ctx.save_for_backward(pred, images, prefix)
    ctx.call = call


def _backward(ctx, grad):
    pred, images, prefix = ctx.saved_tensors
    dpred = _pixel_loss_bwd(grad, pred, images, prefix, ctx.call) if ctx.needs_input_grad[0] else None
    # The images are data: no gradient flows to them through this op (the caller refuses images that
    # require grad; see _pixel_loss_triton).
    return dpred, None, None, None  # pred, images, prefix, call


_pixel_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _images_need_grad(images: torch.Tensor) -> bool:
    return images.requires_grad and torch.is_grad_enabled()


def _pixel_loss_triton(pred, images, prefix_len: Optional[torch.Tensor], params: PixelLossParams) -> torch.Tensor:
    if _images_need_grad(images):
        raise ValueError(
            f"{OP}: backend='triton' treats images as data and gives them no gradient, but images.requires_grad "
            "is True; detach the images, or use backend='reference' (which differentiates through the targets)"
        )
    return _pixel_loss_fwd(pred, images, prefix_len, encode(PixelLossCall(params=params, policy=current_policy())))


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
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference". The Triton path treats the images as data (no gradient): with images that
            require grad, "triton" raises a ValueError and "auto" runs the reference, which
            differentiates through the targets.

    Returns:
        float32 scalar (float64 for float64 inputs): the per-value squared error averaged within each
        patch, then over the counted targets (j >= offset and j >= prefix_len[b]); 0 when none counts.
    """
    params = PixelLossParams(patch_size=patch_size, offset=offset, norm_pix=norm_pix, eps=float(eps))
    check_tensor(pred, "pred", OP)
    check_backend_name(backend, OP)
    if measured_auto(backend):  # aimkern.dispatch chooses; inputs checked as for the reference
        _check_inputs(pred, images, params, "reference")
        prefix = normalize_prefix_len(prefix_len, pred.shape[0], pred.shape[1], pred.device, OP)
        options = dict(patch_size=patch_size, offset=offset, norm_pix=norm_pix, eps=float(eps))
        return run_dispatched(OP, (pred, images, prefix), options, pred.dtype)
    be = resolve_backend(backend, pred, OP)
    if be == "triton" and backend == "auto" and isinstance(images, torch.Tensor) and _images_need_grad(images):
        be = "reference"  # only the reference gives the images a gradient
    _check_inputs(pred, images, params, be)
    prefix = normalize_prefix_len(prefix_len, pred.shape[0], pred.shape[1], pred.device, OP)
    if be == "reference":
        return next_patch_pixel_loss_reference(
            pred, images, patch_size=patch_size, offset=offset, prefix_len=prefix, norm_pix=norm_pix, eps=eps
        )
    return _pixel_loss_triton(pred, images, prefix, params)


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
