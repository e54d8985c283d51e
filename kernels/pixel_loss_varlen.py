"""Triton kernel of `aimkern.next_patch_pixel_loss_varlen`, ``pixel_loss_varlen_kernel``: the normalized
next-patch pixel regression of a pack of S images laid end to end, forward and backward.

pred and patches are (T, D), D = P*P*C, any strides; patches hold the raw patch values (uint8 or float) in
MAE / AIM (p, q, c) order, as aimkern.pack_images makes them. Sequence s holds tokens [cu[s], cu[s + 1]).
One program owns BLOCK_R consecutive rows of the pack. Each row finds its own sequence by a binary search of
cu_seqlens (STEPS = bit length of S halvings, a runtime bound: no recompile as S changes), so a program's rows
may belong to several images. Row i of sequence s (local position l = i - cu[s]) predicts target patch i +
OFFSET, which counts when it lies in s (i + OFFSET < cu[s + 1]) and l + OFFSET >= prefix_len[s]: never a
patch of the next image. With AFFINE, a raw target value x of channel c (value d of a patch is channel
d % C) is first taken to x * in_scale[c] + in_shift[c] in fp32 (the model's input normalization, from two
(C,) fp32 vectors). The target is standardized in fp32 (mean, unbiased variance, eps) when NORM_PIX,
in registers, as kernels/pixel_loss.py does.

  * forward (BACKWARD=False): one fp32 partial per program, the sum over its counted rows of
    mean_d (pred - t)^2; the launcher sums the partials in a fixed order (deterministic, no atomics).
  * backward (BACKWARD=True): d(pred) = scale * (pred - t) for counted rows and zeros elsewhere, scale =
    2 * grad / (D * count) read from memory (no host sync); d(pred) is written contiguous (T, D).
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .launch_table import Choice
from .pixel_loss import _config, _shared


@triton.jit
def pixel_loss_varlen_kernel(
    pred_ptr, patch_ptr, cu_ptr, prefix_ptr, scale_ptr, in_scale_ptr, in_shift_ptr, out_ptr,
    T, S, STEPS, OFFSET, D, C, eps,
    s_pt, s_pd, s_xt, s_xd, s_prefix,
    HAS_PREFIX: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    live = rows < T
    # The sequence of each row: the largest s with cu[s] <= i (cu[lo] <= i < cu[hi] throughout; a zero-length
    # sequence has cu[s] == cu[s + 1] and never holds a row).
    lo = tl.zeros([BLOCK_R], tl.int32)
    hi = tl.zeros([BLOCK_R], tl.int32) + S
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        right = tl.load(cu_ptr + mid, mask=live, other=0) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    start = tl.load(cu_ptr + lo, mask=live, other=0)
    end = tl.load(cu_ptr + lo + 1, mask=live, other=0)
    j = rows + OFFSET  # target patches (global rows)
    counted = live & (j < end)
    if HAS_PREFIX:
        counted &= (j - start) >= tl.load(prefix_ptr + lo * s_prefix, mask=live, other=0)
    full = counted[:, None] & d_ok[None, :]

    t = tl.load(patch_ptr + j.to(tl.int64)[:, None] * s_xt + offs_d[None, :] * s_xd, mask=full,
                other=0).to(tl.float32)
    if AFFINE:  # value d is channel d % C ((p, q, c) order): the model's per-channel input normalization
        chan = offs_d % C
        in_scale = tl.load(in_scale_ptr + chan, mask=d_ok, other=0.0)
        in_shift = tl.load(in_shift_ptr + chan, mask=d_ok, other=0.0)
        t = tl.where(full, t * in_scale[None, :] + in_shift[None, :], 0.0)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / D
        diff = tl.where(full, t - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / (D - 1)  # unbiased, as MAE and AIM
        t = diff * (1.0 / tl.sqrt(var + eps))[:, None]

    pr = tl.load(pred_ptr + rows.to(tl.int64)[:, None] * s_pt + offs_d[None, :] * s_pd, mask=full,
                 other=0.0).to(tl.float32)
    err = tl.where(full, pr - t, 0.0)
    if BACKWARD:
        scale = tl.load(scale_ptr)
        out = out_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(out, (err * scale).to(out_ptr.dtype.element_ty), mask=live[:, None] & d_ok[None, :])
    else:
        per_row = tl.sum(err * err, axis=1) / D
        tl.store(out_ptr + pid, tl.sum(per_row, axis=0))


@functools.lru_cache(maxsize=None)
def loss(t: int, d: int) -> Choice:
    """pixel_loss_varlen_kernel for a pack of T tokens of D = P*P*C values; grid (cdiv(T, BLOCK_R),). The
    dense pixel loss's tile rule and shared-memory bound (one fp32 (BLOCK_R, BLOCK_D) tile)."""
    return Choice(pixel_loss_varlen_kernel, (_config(t, d, 8192),), _config(t, d, 16384), shared=_shared)


def search_steps(s: int) -> int:
    """Halvings of [0, S] down to one sequence: the bit length of S."""
    return max(1, int(s).bit_length())
