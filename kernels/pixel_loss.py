"""Triton kernel of `aimkern.next_patch_pixel_loss`, ``pixel_loss_kernel``: normalized next-patch pixel
regression, forward and backward.

One program owns BLOCK_R consecutive prediction rows i of one image b. Row i predicts target patch
j = i + OFFSET, which counts when j < N and j >= prefix_len[b] (j >= OFFSET holds since i >= 0). For each
row the program gathers the P*P*C target values of patch j straight from the (B, C, H, W) images in
MAE/AIM (p, q, c) order, standardizes them in fp32 (mean, unbiased variance, eps) when NORM_PIX, and
compares them with pred row i. The normalized targets live only in registers.

  * forward (BACKWARD=False): writes one fp32 partial per program, sum over its counted rows of
    mean_d (pred - t)^2; the launcher sums the partials in a fixed order (deterministic, no atomics)
    and divides by the number of counted targets.
  * backward (BACKWARD=True): recomputes the targets and writes d(pred) = scale * (pred - t) for the
    counted rows and zeros elsewhere, where scale = 2 * grad / (P*P*C * count) is one fp32 value read
    from memory (no host sync).

Shapes: pred (B, N, D) with D = P*P*C, any strides; images (B, C, H, W), any strides; prefix (B,) int32,
any stride;
d(pred) is written contiguous (B, N, D).
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .launch_table import Choice, cfg


@triton.jit
def pixel_loss_kernel(
    pred_ptr, img_ptr, prefix_ptr, scale_ptr, out_ptr,
    N_TOK, GW, OFFSET, D, R_BLOCKS, eps,
    s_pb, s_pn, s_pd,
    s_ib, s_ic, s_ih, s_iw, s_prefix,
    P: tl.constexpr, C: tl.constexpr, HAS_PREFIX: tl.constexpr, NORM_PIX: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # flat grid: row blocks of one image are neighbours
    b = pid // R_BLOCKS
    pid_r = pid % R_BLOCKS
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # prediction rows i
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    j = rows + OFFSET  # target patches
    counted = (rows < N_TOK) & (j < N_TOK)
    if HAS_PREFIX:
        counted &= j >= tl.load(prefix_ptr + b * s_prefix)  # any stride: a slice of a batch's prefix table
    full = counted[:, None] & d_ok[None, :]

    # Gather target patch j in (p, q, c) order: value d = (p * P + q) * C + c.
    c = offs_d % C
    pq = offs_d // C
    col = c * s_ic + (pq // P) * s_ih + (pq % P) * s_iw
    gh = j // GW
    gw = j % GW
    row = b.to(tl.int64) * s_ib + (gh * P) * s_ih + (gw * P) * s_iw
    t = tl.load(img_ptr + row[:, None] + col[None, :], mask=full, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / D
        diff = tl.where(full, t - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / (D - 1)  # unbiased, as MAE and AIM
        t = diff * (1.0 / tl.sqrt(var + eps))[:, None]

    pred_rows = pred_ptr + b.to(tl.int64) * s_pb + rows.to(tl.int64) * s_pn
    pr = tl.load(pred_rows[:, None] + offs_d[None, :] * s_pd, mask=full, other=0.0).to(tl.float32)
    err = tl.where(full, pr - t, 0.0)
    if BACKWARD:
        scale = tl.load(scale_ptr)
        out = out_ptr + (b.to(tl.int64) * N_TOK + rows)[:, None] * D + offs_d[None, :]
        # Every row of d(pred) is written: rows that predict nothing counted get zeros.
        tl.store(out, (err * scale).to(out_ptr.dtype.element_ty), mask=(rows < N_TOK)[:, None] & d_ok[None, :])
    else:
        per_row = tl.sum(err * err, axis=1) / D
        tl.store(out_ptr + pid, tl.sum(per_row, axis=0))


def _config(n_tok: int, d: int, budget: int) -> triton.Config:
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(budget // block_d, 16, triton.next_power_of_2(max(n_tok, 1))))
    return cfg(8 if block_r * block_d >= 8192 else 4, 1, BLOCK_R=block_r, BLOCK_D=block_d)


@functools.lru_cache(maxsize=None)
def loss(n_tok: int, d: int) -> Choice:
    """pixel_loss_kernel for N tokens of D = P*P*C values; flat grid (B * cdiv(N, BLOCK_R),).

    BLOCK_R rows of BLOCK_D = next_pow2(D) values per program. On Hopper about 8K values per program (4-8
    patches of 768) keeps 32 fp32 registers per thread and tensor while leaving enough programs
    (B * N / BLOCK_R) to fill the card many times. Under the interpreter, larger blocks mean fewer (slow)
    programs. One config: the launcher sizes its partial-sum buffer from BLOCK_R.
    """
    return Choice(pixel_loss_kernel, (_config(n_tok, d, 8192),), _config(n_tok, d, 16384), shared=_shared)


def _shared(config: triton.Config, constexprs: dict, elem: int) -> int:
    """Bytes of shared memory one program may take: one fp32 (BLOCK_R, BLOCK_D) tile. The row sums and the
    normalisation move the tile between register layouts, and Triton 3.6 stages that conversion through
    shared memory (32 KB at BLOCK_R = 8, BLOCK_D = 1024; Triton 3.8 needs less). The compile gate holds
    every compile to this bound."""
    return config.kwargs["BLOCK_R"] * config.kwargs["BLOCK_D"] * 4
