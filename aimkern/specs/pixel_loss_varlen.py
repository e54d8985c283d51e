"""The spec of ``aimkern.next_patch_pixel_loss_varlen``: checks, candidates, key parts, tolerance.

Tensors, in order: pred (T, D) float; patches (T, D) raw patch values, uint8 or float; cu_seqlens int32
(S + 1,); prefix_len None or int32 (S,). Candidates (each ``fn(pred, patches, cu_seqlens, prefix_len, params)``):

    triton     aimkern's fused kernel (one read of pred and patches forward, one backward; patches are data)
    reference  aimkern.reference.next_patch_pixel_loss_varlen_reference, sequence by sequence
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..checks import can_inspect_values, check_float_dtype, check_same_device, check_tensor
from ..ops.pixel_loss_varlen import PixelLossVarlenParams, pixel_loss_varlen_triton
from ..reference.pixel_loss_varlen import next_patch_pixel_loss_varlen_reference
from .attention_varlen import _lengths, _per_sequence, check_cu_seqlens, check_values
from .common import PIXEL_LOSS_TOLERANCE, channel_values, loss_kernel_unsupported, pow2, randn
from .opspec import Candidate, OpSpec, Problem, add_spec

NAME = "next_patch_pixel_loss_varlen"
PATCH_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_affine(patches: torch.Tensor, params: PixelLossVarlenParams, op: str) -> PixelLossVarlenParams:
    """``params`` with input_scale / input_shift as tuples of C floats: both or neither, for uint8 patches
    only, C dividing the patch's values."""
    if (params.input_scale is None) != (params.input_shift is None):
        raise ValueError(f"{op}: input_scale and input_shift go together: give both or neither")
    if params.input_scale is None:
        return params
    if patches.dtype != torch.uint8:
        raise ValueError(f"{op}: input_scale / input_shift normalize uint8 patches; {patches.dtype} patches are "
                         "taken as they are")
    c = len(params.input_scale) if isinstance(params.input_scale, (tuple, list)) else 0
    if c < 1 or patches.shape[1] % c:
        raise ValueError(f"{op}: input_scale must hold C floats (one per channel) with C dividing the "
                         f"{patches.shape[1]} values of a patch, got {params.input_scale!r}")
    return replace(params, input_scale=channel_values(params.input_scale, "input_scale", c, op),
                   input_shift=channel_values(params.input_shift, "input_shift", c, op))


def check(tensors: tuple, params: PixelLossVarlenParams, backend: str, op: str = NAME) -> tuple:
    """((pred, patches, cu_seqlens int32, prefix_len None or int32 (S,)), params), checked. Reads cu_seqlens
    (and prefix_len) on the host once to check their values, except under torch.compile or with
    ``max_seqlen`` given."""
    pred, patches, cu, prefix_len = tensors
    check_tensor(pred, "pred", op, ndim=2)
    check_tensor(patches, "patches", op, ndim=2)
    if isinstance(params.offset, bool) or not isinstance(params.offset, int) or params.offset < 0:
        raise ValueError(f"{op}: offset must be an int >= 0, got {params.offset!r}")
    if not isinstance(params.norm_pix, bool):
        raise TypeError(f"{op}: norm_pix must be a bool, got {type(params.norm_pix).__name__}")
    if not params.eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {params.eps}")
    m = params.max_seqlen
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"{op}: max_seqlen must be None or an int >= 1 (a host bound on the images' lengths), "
                         f"got {m!r}")
    if pred.shape != patches.shape:
        raise ValueError(f"{op}: pred and patches must have the same shape (T, P*P*C), got {tuple(pred.shape)} "
                         f"and {tuple(patches.shape)}")
    t, d = pred.shape
    if t < 1:
        raise ValueError(f"{op}: T (the packed token count) must be >= 1, got {t}")
    if params.norm_pix and d < 2:
        raise ValueError(f"{op}: norm_pix needs at least 2 values per patch (P*P*C >= 2) for the unbiased variance")
    check_same_device((("pred", pred), ("patches", patches)), op)
    check_float_dtype(pred, "pred", op, backend)
    allowed = PATCH_DTYPES if backend != "triton" else PATCH_DTYPES[:-1]
    if patches.dtype not in allowed:
        raise TypeError(f"{op}: patches must be one of {', '.join(str(x)[6:] for x in allowed)} for "
                        f"backend={backend!r}, got {patches.dtype}")
    params = check_affine(patches, params, op)
    cu = check_cu_seqlens(cu, t, pred.device, op)
    s = cu.numel() - 1
    if isinstance(prefix_len, bool):
        raise TypeError(f"{op}: prefix_len must be None, an int or an integer tensor of shape (S,), got a bool")
    if isinstance(prefix_len, int):
        if prefix_len < 0:
            raise ValueError(f"{op}: prefix_len must be >= 0, got {prefix_len}")
        prefix_len = torch.full((s,), prefix_len, dtype=torch.int32, device=pred.device)
        checked_prefix = None  # an int may exceed a short image's length: it then has no target
    else:
        prefix_len = checked_prefix = _per_sequence(prefix_len, "prefix_len", s, pred.device, op)
    if can_inspect_values() and m is None:  # max_seqlen given: no host read (the caller vouches for the pack)
        check_values(cu, t, {} if checked_prefix is None else {"prefix_len": checked_prefix}, op)
    return (pred, patches, cu, prefix_len), replace(params, max_seqlen=None)  # one dispatch key with or without


def reference(pred, patches, cu, prefix_len: Optional[torch.Tensor], params: PixelLossVarlenParams) -> torch.Tensor:
    return next_patch_pixel_loss_varlen_reference(pred, patches, cu, offset=params.offset, prefix_len=prefix_len,
                                                  norm_pix=params.norm_pix, eps=params.eps,
                                                  input_scale=params.input_scale, input_shift=params.input_shift)


def needs_reference(tensors: tuple) -> bool:
    """Patches that require grad: only the reference gives them a gradient."""
    patches = tensors[1]
    return isinstance(patches, torch.Tensor) and patches.requires_grad and torch.is_grad_enabled()


def _triton_unsupported(problem: Problem) -> Optional[str]:
    return loss_kernel_unsupported(problem, "patches", PATCH_DTYPES[:-1])


def mask_kind(problem: Problem) -> str:
    params = problem.params
    kind = f"offset{params.offset}" + ("+prefix" if problem.shapes[3] is not None else "")
    return kind + ("" if params.norm_pix else "+raw")


def shape_band(problem: Problem) -> str:
    t, d = problem.shapes[0]
    return f"t<={pow2(t)}|s<={pow2(problem.shapes[2][0] - 1)}|d{d}|{problem.dtypes[1]}"


def small_problem(problem: Problem) -> Problem:
    """At most 3 images in T <= 40 tokens, the same D, dtypes and options."""
    t, d = problem.shapes[0]
    s = problem.shapes[2][0] - 1
    t2, s2 = min(t, 40), min(s, 3, t)
    return problem.with_(shapes=((t2, d), (t2, d), (s2 + 1,), None if problem.shapes[3] is None else (s2,)))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    t, d = problem.shapes[0]
    s = problem.shapes[2][0] - 1
    pred = randn(problem, 0, gen)
    raw = torch.rand((t, d), generator=gen) * 255
    patches = (raw.round().to(torch.uint8) if problem.dtype_of(1) == torch.uint8 else raw.to(problem.dtype_of(1)))
    patches = patches.to(problem.device).requires_grad_(bool(problem.requires_grad[1]))
    lengths = _lengths(t, s, gen)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=problem.device)
    prefix = None
    if problem.shapes[3] is not None:
        prefix = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths],
                              dtype=torch.int32, device=problem.device)
    return pred, patches, cu, prefix


SPEC = add_spec(OpSpec(
    name=NAME,
    tensor_args=("pred", "patches", "cu_seqlens", "prefix_len"),
    positional=3,
    params_type=PixelLossVarlenParams,
    check=check,
    reference=reference,
    triton=pixel_loss_varlen_triton,
    candidates=[
        Candidate("triton", pixel_loss_varlen_triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("reference", reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    shape_band=shape_band,
    tolerance=PIXEL_LOSS_TOLERANCE,
    needs_reference=needs_reference,
))
