"""Triton kernels of `aimkern.patch_embed`: patchify + GEMM + bias + position embedding, and its backward.

Shapes: images (B, C, H, W), weight (E, C, P, P) in nn.Conv2d layout, tokens M = B * N with
N = (H // P) * (W // P) in raster order, K = C * P * P with k = c * P * P + p * P + q (the order of
``weight.reshape(E, K)``). No patch copy is ever made: the kernels gather the (token, k) matrix straight
from the strided images with the separable address ``row(token) + col(k)``.

uint8 images (NORMALIZE): the forward and dW kernels load the raw pixels and make each GEMM input
``x * scale[c] + shift[c]`` in fp32 (scale, shift: fp32 (C,) tensors, c = k // (P * P)), cast to the
weight's dtype, in registers: normalization costs no pass and no copy. There is no dX for them.

Kernels:
  * ``patch_embed_fwd_kernel``: out[m, e] = sum_k x[m, k] W[e, k] + bias[e] + pos[n(m), e], tile (M, E).
  * ``patch_embed_dw_kernel``: dW partials and d(pos) partials in one pass over dOut. A program owns one
    (E, K) tile of dW and one slice = (block of token positions n, chunk of images b); it loops over its
    images. Slices write fp32 partials that the launcher sums in a fixed order (deterministic, no
    atomics). The programs of k-tile 0 also sum dOut over their images: d(pos) partials (b chunk, N, E);
    db = d(pos) summed over n.
  * ``patch_embed_dx_kernel``: dImages[m, k] = sum_e dOut[m, e] W[e, k], scattered back to NCHW (patches
    do not overlap, so every pixel is written once, by one program).

Launch configs live here too, as ``Choice``s (kernels/launch_table.py): autotuned Hopper configs for the
two big 16-bit GEMMs, one fixed config for small or fp32 ones, and a per-shape heuristic for the dW split
(its partial buffer depends on the tiling, so it is not autotuned).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch_table import Choice, cfg, tunable


@triton.jit
def _token_offsets(offs_m, N_TOK, GW, s_b, s_h, s_w, P: tl.constexpr):
    """Image offset of the top-left pixel of token m = b * N + gh * GW + gw (int64: B * C * H * W may be large)."""
    b = offs_m // N_TOK
    n = offs_m % N_TOK
    gh = n // GW
    gw = n % GW
    return b.to(tl.int64) * s_b + (gh * P) * s_h + (gw * P) * s_w


@triton.jit
def _patch_offsets(offs_k, s_c, s_h, s_w, P: tl.constexpr):
    """Offset of value k = c * P * P + p * P + q inside a patch (nn.Conv2d weight order)."""
    c = offs_k // (P * P)
    r = offs_k % (P * P)
    p = r // P
    q = r % P
    return c * s_c + p * s_h + q * s_w


@triton.jit
def _normalized(x, scale_ptr, shift_ptr, offs_k, k_ok, P: tl.constexpr, dtype: tl.constexpr):
    """uint8 pixels x (rows, k) -> ``x * scale[c] + shift[c]`` in fp32, c = k // (P * P), as ``dtype``."""
    c = offs_k // (P * P)
    scale = tl.load(scale_ptr + c, mask=k_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=k_ok, other=0.0)
    return (x.to(tl.float32) * scale[None, :] + shift[None, :]).to(dtype)


@triton.jit
def patch_embed_fwd_kernel(
    img_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr, scale_ptr, shift_ptr,
    M, N_TOK, GW, E, K,
    s_ib, s_ic, s_ih, s_iw,
    s_we, s_wc, s_wh, s_ww,
    s_pn, s_pe, s_bias,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One flat grid (no 65,535 limit on M tiles). E tiles vary fastest so the programs sharing one
    # block of tokens run together and the image tile they all gather is served from L2.
    pid = tl.program_id(0)
    e_tiles = tl.cdiv(E, BLOCK_E)
    pid_e = pid % e_tiles
    pid_m = pid // e_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_ok = offs_m < M
    e_ok = offs_e < E
    row = _token_offsets(offs_m, N_TOK, GW, s_ib, s_ih, s_iw, P)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K  # K = C * P * P is rarely a power of two
        x = tl.load(img_ptr + row[:, None] + _patch_offsets(offs_k, s_ic, s_ih, s_iw, P)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptr + offs_e[None, :] * s_we + _patch_offsets(offs_k, s_wc, s_wh, s_ww, P)[:, None],
                    mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        if NORMALIZE:  # rows past M get shift, not 0: their outputs are never stored
            x = _normalized(x, scale_ptr, shift_ptr, offs_k, k_ok, P, w_ptr.dtype.element_ty)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_e * s_bias, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        n = offs_m % N_TOK
        pos = tl.load(pos_ptr + n[:, None] * s_pn + offs_e[None, :] * s_pe,
                      mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * E + offs_e[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & e_ok[None, :])


@triton.jit
def patch_embed_dw_kernel(
    g_ptr, img_ptr, dw_ptr, dpos_ptr, scale_ptr, shift_ptr,
    B, N_TOK, GW, E, K, B_PER_SLICE, N_BLOCKS,
    s_gb, s_gn, s_ge,
    s_ib, s_ic, s_ih, s_iw,
    P: tl.constexpr, WANT_W: tl.constexpr, WANT_POS: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dw_ptr: fp32 (S, E, K) partials, S = slices; dpos_ptr: fp32 (b chunks, N, E) partials.
    # NORMALIZE: uint8 images, normalized as the forward did; the GEMM runs in dOut's dtype (the weight's).
    pid_ek = tl.program_id(0)
    pid_s = tl.program_id(1)
    if WANT_W:
        k_tiles = tl.cdiv(K, BLOCK_K)
    else:
        k_tiles = 1  # only d(pos) wanted: one program per (e tile, slice)
    pid_e = pid_ek // k_tiles
    pid_k = pid_ek % k_tiles
    n_blk = pid_s % N_BLOCKS
    b_chunk = pid_s // N_BLOCKS

    offs_t = n_blk * BLOCK_T + tl.arange(0, BLOCK_T)  # token positions n inside one image
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_ok = offs_t < N_TOK
    e_ok = offs_e < E
    k_ok = offs_k < K
    # Token offsets within one image (b = 0); the image term is added per loop step.
    x_off = _token_offsets(offs_t, N_TOK, GW, s_ib, s_ih, s_iw, P)[:, None] \
        + _patch_offsets(offs_k, s_ic, s_ih, s_iw, P)[None, :]
    g_off = offs_t[:, None] * s_gn + offs_e[None, :] * s_ge  # strides may be 0 (expanded gradients)

    acc_w = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    acc_pos = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    b_lo = b_chunk * B_PER_SLICE
    b_hi = tl.minimum(b_lo + B_PER_SLICE, B)
    # Pointers advance one image per step (pointer arithmetic is 64-bit, so no int32 overflow).
    g_img = g_ptr + b_lo.to(tl.int64) * s_gb
    x_img = img_ptr + b_lo.to(tl.int64) * s_ib
    for _ in range(b_lo, b_hi):
        g = tl.load(g_img + g_off, mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        if WANT_POS:
            acc_pos += g.to(tl.float32)
        if WANT_W:
            x = tl.load(x_img + x_off, mask=t_ok[:, None] & k_ok[None, :], other=0)
            if NORMALIZE:  # rows past N get shift, not 0, but meet g = 0 there
                x = _normalized(x, scale_ptr, shift_ptr, offs_k, k_ok, P, g_ptr.dtype.element_ty)
            acc_w += tl.dot(tl.trans(g.to(x.dtype)), x, input_precision=DOT_PRECISION)
        g_img += s_gb
        x_img += s_ib
    if WANT_W:
        dw = dw_ptr + pid_s.to(tl.int64) * E * K + offs_e[:, None] * K + offs_k[None, :]
        tl.store(dw, acc_w, mask=e_ok[:, None] & k_ok[None, :])
    if WANT_POS:
        # Only the k-tile-0 program of each (e tile, slice) owns these d(pos) values.
        dpos = dpos_ptr + (b_chunk * N_TOK + offs_t)[:, None].to(tl.int64) * E + offs_e[None, :]
        tl.store(dpos, acc_pos, mask=t_ok[:, None] & e_ok[None, :] & (pid_k == 0))


@triton.jit
def patch_embed_dx_kernel(
    g_ptr, w_ptr, dx_ptr,
    M, N_TOK, GW, E, K,
    s_gb, s_gn, s_ge,
    s_we, s_wc, s_wh, s_ww,
    s_xb, s_xc, s_xh, s_xw,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)  # flat grid, K tiles fastest (they share the dOut rows)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = pid % k_tiles
    pid_m = pid // k_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    k_ok = offs_k < K
    b = offs_m // N_TOK
    n = offs_m % N_TOK
    g_row = b.to(tl.int64) * s_gb + n * s_gn
    w_col = _patch_offsets(offs_k, s_wc, s_wh, s_ww, P)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        g = tl.load(g_ptr + g_row[:, None] + offs_e[None, :] * s_ge, mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_e[:, None] * s_we + w_col[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(g.to(w.dtype), w, input_precision=DOT_PRECISION)
    dx = dx_ptr + _token_offsets(offs_m, N_TOK, GW, s_xb, s_xh, s_xw, P)[:, None] \
        + _patch_offsets(offs_k, s_xc, s_xh, s_xw, P)[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------ configs
# Hopper: 128 x 128 output tiles, 4-8 warps, a 3-4 stage software pipeline on the K loop. The gathered
# operand cannot use TMA (its addresses are not a plain 2-D box), so cp.async pipelining does the work.
# Dropped after the compile gate (sm_90a, with bias and position add): 128 x 256 x 64 on 8 warps spills
# 432-448 B, 128 x 128 x 32 on 4 warps 56 B.
GEMM_CONFIGS = (
    cfg(8, 3, BLOCK_M=128, BLOCK_E=128, BLOCK_K=64),
    cfg(4, 4, BLOCK_M=64, BLOCK_E=128, BLOCK_K=64),
)
DX_CONFIGS = (
    cfg(8, 3, BLOCK_M=128, BLOCK_K=128, BLOCK_E=64),
    cfg(4, 4, BLOCK_M=128, BLOCK_K=64, BLOCK_E=64),
    cfg(4, 4, BLOCK_M=64, BLOCK_K=128, BLOCK_E=64),
)
# Small GEMMs (tests, odd shapes) and fp32 (whose tiles are twice the bytes) take one fixed config.
SMALL_FWD = cfg(4, 2, BLOCK_M=64, BLOCK_E=64, BLOCK_K=32)
SMALL_DX = cfg(4, 2, BLOCK_M=64, BLOCK_K=64, BLOCK_E=32)
# Under the interpreter every program is a numpy loop: few, large tiles are fastest.
INTERPRETER_FWD = cfg(4, 1, BLOCK_M=64, BLOCK_E=64, BLOCK_K=32)
INTERPRETER_DX = cfg(4, 1, BLOCK_M=64, BLOCK_K=128, BLOCK_E=32)
# dW / d(pos): one config per operand width (the partial buffer depends on the tiling, so no autotuning).
DW_16BIT = cfg(8, 3, BLOCK_T=64, BLOCK_E=128, BLOCK_K=128)  # 2 x 16 KB of operands per stage
DW_FP32 = cfg(4, 2, BLOCK_T=32, BLOCK_E=64, BLOCK_K=64)  # fp32: keep the stages within shared memory
INTERPRETER_DW = cfg(4, 1, BLOCK_T=32, BLOCK_E=32, BLOCK_K=128)



def _gemm_shared(a_rows: str, b_cols: str, depth: str):
    """Choice.shared of a GEMM whose K loop runs over ``depth``: an (a_rows x depth) and a (depth x b_cols)
    operand tile per pipeline stage (fp32: one stage more, for 3xTF32's split operand). Calibrated on
    sm_90a builds (sm_80's pipelines hold one stage less); the compile gate checks every compile."""
    def shared(c, k: dict, e: int) -> int:
        kw = c.kwargs
        return (max(1, c.num_stages) + (e == 4)) * (kw[a_rows] + kw[b_cols]) * kw[depth] * e
    return shared


_FWD_SHARED = _gemm_shared("BLOCK_M", "BLOCK_E", "BLOCK_K")  # patches x weight^T over the patch pixels
_DX_SHARED = _gemm_shared("BLOCK_M", "BLOCK_K", "BLOCK_E")  # d out x weight over the embedding
_DW_SHARED = _gemm_shared("BLOCK_E", "BLOCK_K", "BLOCK_T")  # d out^T x patches over the tokens
_FWD_BIG = Choice(patch_embed_fwd_kernel, GEMM_CONFIGS, INTERPRETER_FWD, key=("M", "E", "K"), shared=_FWD_SHARED)
_FWD_SMALL = Choice(patch_embed_fwd_kernel, (SMALL_FWD,), INTERPRETER_FWD, shared=_FWD_SHARED)
_DX_BIG = Choice(patch_embed_dx_kernel, DX_CONFIGS, INTERPRETER_DX, key=("M", "E", "K"), shared=_DX_SHARED)
_DX_SMALL = Choice(patch_embed_dx_kernel, (SMALL_DX,), INTERPRETER_DX, shared=_DX_SHARED)
_DW = {True: Choice(patch_embed_dw_kernel, (DW_16BIT,), INTERPRETER_DW, shared=_DW_SHARED),
       False: Choice(patch_embed_dw_kernel, (DW_FP32,), INTERPRETER_DW, shared=_DW_SHARED)}


def forward(macs: int, sixteen_bit: bool) -> Choice:
    """patch_embed_fwd_kernel; flat grid (cdiv(E, BLOCK_E) * cdiv(M, BLOCK_M),)."""
    return _FWD_BIG if tunable(macs, sixteen_bit) else _FWD_SMALL


def backward_images(macs: int, sixteen_bit: bool) -> Choice:
    """patch_embed_dx_kernel; flat grid (cdiv(K, BLOCK_K) * cdiv(M, BLOCK_M),)."""
    return _DX_BIG if tunable(macs, sixteen_bit) else _DX_SMALL


def backward_params(sixteen_bit: bool) -> Choice:
    """patch_embed_dw_kernel (one config: ``dw_slicing`` sizes the partial buffers from its tiles)."""
    return _DW[sixteen_bit]


def dw_slicing(batch: int, n_tok: int, e: int, k: int, want_w: bool, meta: dict, sm_count: int,
               interpreting: bool) -> dict:
    """How the dW / d(pos) programs split the batch, for block sizes ``meta``.

    Returns ``b_per_slice`` (images per program), ``b_chunks`` and ``n_blocks`` (token blocks). On the GPU
    the images are split into chunks until there are about two waves of programs, which keeps the fp32
    partial buffer (slices x E x K) small: each slice costs one E x K fp32 write and read. Under the
    interpreter two chunks whenever B > 1, so the tests exercise the partial reduction.
    """
    n_blocks = triton.cdiv(n_tok, meta["BLOCK_T"])
    if interpreting:
        b_chunks = min(batch, 2)
    else:
        ek_tiles = triton.cdiv(e, meta["BLOCK_E"]) * (triton.cdiv(k, meta["BLOCK_K"]) if want_w else 1)
        b_chunks = max(1, min(batch, triton.cdiv(2 * sm_count, ek_tiles * n_blocks)))
    b_per_slice = triton.cdiv(batch, max(b_chunks, 1)) if batch else 1
    return {"b_per_slice": b_per_slice, "b_chunks": triton.cdiv(batch, b_per_slice) if batch else 0,
            "n_blocks": n_blocks}
