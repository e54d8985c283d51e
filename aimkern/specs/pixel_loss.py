"""The spec of ``aimkern.next_patch_pixel_loss``: checks, candidates, key parts, tolerance.

Candidates (each ``fn(pred, images, prefix_len, params)``):

    triton     aimkern's fused kernel (one read of pred and images forward, one backward; images are data)
    reference  patchify + per-patch normalization + shift + masked MSE in PyTorch
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_float_dtype, check_same_device, check_tensor, normalize_prefix_len
from ..ops.pixel_loss import PixelLossParams, images_need_grad, pixel_loss_triton
from ..reference.pixel_loss import next_patch_pixel_loss_reference
from .common import KERNEL_DTYPES, PIXEL_LOSS_TOLERANCE, exact_or_pow2, loss_kernel_unsupported, pow2, randint, randn
from .opspec import Candidate, OpSpec, Problem, add_spec

NAME = "next_patch_pixel_loss"


def check(tensors: tuple, params: PixelLossParams, backend: str, op: str = NAME) -> tuple:
    """((pred (B, N, P*P*C), images (B, C, H, W), prefix_len as None or int32 (B,)), params), checked."""
    pred, images, prefix_len = tensors
    check_tensor(pred, "pred", op, ndim=3)
    check_tensor(images, "images", op, ndim=4)
    p = params.patch_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{op}: patch_size must be an int >= 1, got {p!r}")
    if isinstance(params.offset, bool) or not isinstance(params.offset, int) or params.offset < 0:
        raise ValueError(f"{op}: offset must be an int >= 0, got {params.offset!r}")
    if not isinstance(params.norm_pix, bool):
        raise TypeError(f"{op}: norm_pix must be a bool, got {type(params.norm_pix).__name__}")
    if not params.eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {params.eps}")
    b, c, h, w = images.shape
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{op}: image height and width must be positive multiples of patch_size={p}, got H={h}, W={w}")
    n = (h // p) * (w // p)
    if tuple(pred.shape) != (b, n, p * p * c):
        raise ValueError(f"{op}: pred must have shape (B, N, P*P*C) = ({b}, {n}, {p * p * c}), got {tuple(pred.shape)}")
    if params.norm_pix and p * p * c < 2:
        raise ValueError(f"{op}: norm_pix needs at least 2 values per patch (P*P*C >= 2) for the unbiased variance")
    check_same_device((("pred", pred), ("images", images)), op)
    check_float_dtype(pred, "pred", op, backend)
    check_float_dtype(images, "images", op, backend)
    return (pred, images, normalize_prefix_len(prefix_len, pred.shape[0], pred.shape[1], pred.device, op)), params


def reference(pred, images, prefix_len: Optional[torch.Tensor], params: PixelLossParams) -> torch.Tensor:
    return next_patch_pixel_loss_reference(pred, images, patch_size=params.patch_size, offset=params.offset,
                                           prefix_len=prefix_len, norm_pix=params.norm_pix, eps=params.eps)


def needs_reference(tensors: tuple) -> bool:
    """Images that require grad: only the reference gives them a gradient (the fixed rule then runs it)."""
    images = tensors[1]
    return isinstance(images, torch.Tensor) and images_need_grad(images)


def _triton_unsupported(problem: Problem) -> Optional[str]:
    return loss_kernel_unsupported(problem, "images", KERNEL_DTYPES)


def mask_kind(problem: Problem) -> str:
    params = problem.params
    kind = f"offset{params.offset}" + ("+prefix" if problem.shapes[2] is not None else "")
    return kind + ("" if params.norm_pix else "+raw")


def shape_band(problem: Problem) -> str:
    b, n, d = problem.shapes[0]
    return f"b<={pow2(b)}|n{exact_or_pow2(n)}|d{d}|c{problem.shapes[1][1]}"


def small_problem(problem: Problem) -> Problem:
    """Two images of at most 3 x 5 patches, the same patch size, channels and options."""
    b, c, h, w = problem.shapes[1]
    p = problem.params.patch_size
    h2, w2 = min(h, 3 * p), min(w, 5 * p)
    b2 = min(b, 2)
    n2 = (h2 // p) * (w2 // p)
    return problem.with_(shapes=((b2, n2, problem.shapes[0][2]), (b2, c, h2, w2),
                                 (b2,) if problem.shapes[2] is not None else None))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    n = problem.shapes[0][1]
    return randn(problem, 0, gen), randn(problem, 1, gen), randint(problem, 2, 0, n + 1, gen)


SPEC = add_spec(OpSpec(
    name=NAME,
    tensor_args=("pred", "images", "prefix_len"),
    positional=2,
    params_type=PixelLossParams,
    check=check,
    reference=reference,
    triton=pixel_loss_triton,
    candidates=[
        Candidate("triton", pixel_loss_triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("reference", reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    tolerance=PIXEL_LOSS_TOLERANCE,
    needs_reference=needs_reference,
))
