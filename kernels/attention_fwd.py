"""Attention forward kernel (FlashAttention-2 tiling) and the mask / tile-bound helpers the backward shares.

Mask (docs/design.md, "Masks"): query i sees key j when ``j < prefix_len[b]``, or not ``IS_CAUSAL``, or
``j // block_size <= i // block_size``. For a tile of queries [m0, m0 + BLOCK_M) the keys split in three
classes, computed in-kernel from prefix_len[b] and block_size (so they differ per sample):

    [0, full_end)   seen by every query of the tile: no mask arithmetic at all
    [full_end, hi)  the boundary (causal band, prefix edge, the ragged end at N): masked
    [hi, N)         seen by no query of the tile: never loaded

Every tensor is addressed through its own strides (B, H, N, D order), so q, k, v may be strided views of a
packed qkv activation and the output may be (B, N, H, D) memory seen as (B, H, N, D). Scores live in the
log2 domain (``qk_scale = scale * log2(e)``) so the softmax uses exp2; the saved logsumexp is natural-log.
"""
import triton
import triton.language as tl


@triton.jit
def load_rows(base, rows, n_rows, offs_d, stride_n, stride_d,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and columns >= HEAD_D read as 0."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D), other=0.0)
    else:
        if BLOCK_D == HEAD_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    return x


@triton.jit
def store_rows(base, x, rows, n_rows, offs_d, stride_n, stride_d, HEAD_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D))


@triton.jit
def visible(q_idx, k_idx, n, prefix, block_size, IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Boolean visibility of broadcastable query / key index tensors; keys >= n are never visible."""
    vis = k_idx < n
    if IS_CAUSAL:
        seen = (k_idx // block_size) <= (q_idx // block_size)
        if HAS_PREFIX:
            seen = seen | (k_idx < prefix)
        vis = vis & seen
    else:
        vis = vis & (q_idx >= 0)  # broadcast to the full tile shape
    return vis


@triton.jit
def key_bounds(m0, n, prefix, block_size, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(full_end, hi) for queries [m0, m0 + BLOCK_M): keys < full_end are seen by all of them, keys >= hi by none.

    A query i sees every key below max(prefix, (i // block_size + 1) * block_size); the tile's first query
    bounds what all see, its last real query what any sees.
    """
    if IS_CAUSAL:
        last_q = tl.minimum(m0 + BLOCK_M, n) - 1
        full_end = tl.minimum(tl.maximum(prefix, (m0 // block_size + 1) * block_size), n)
        hi = tl.minimum(tl.maximum(prefix, (last_q // block_size + 1) * block_size), n)
    else:
        full_end = n
        hi = n
    return full_end, hi


@triton.jit
def query_bounds(n0, n, prefix, block_size, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(lo, full_start) for keys [n0, n0 + BLOCK_N): queries < lo see none of them, queries >= full_start all.

    A key j >= prefix is seen by queries i >= (j // block_size) * block_size; a prefix key by every query.
    """
    if IS_CAUSAL:
        last_k = tl.minimum(n0 + BLOCK_N, n) - 1
        lo = tl.where(n0 < prefix, 0, (n0 // block_size) * block_size)
        full_start = tl.where(last_k < prefix, 0, (last_k // block_size) * block_size)
    else:
        lo = n * 0
        full_start = n * 0
    return lo, full_start


@triton.jit
def key_tile_scores(q, k_base, v_base, start_n, offs_m, offs_d, skn, skd, svn, svd, n, prefix, block_size,
                    qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Load the key / value tile at ``start_n``; return (k, v, s) with s = q k^T in the log2 domain.

    Only MASKED (boundary) tiles check rows against N and set invisible scores to -inf; whole visible
    tiles skip both. Shared by the forward and the dQ pass so the two see exactly the same scores.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, n, offs_d, skn, skd, HEAD_D, BLOCK_D, MASKED)
    v = load_rows(v_base, offs_n, n, offs_d, svn, svd, HEAD_D, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        vis = visible(offs_m[:, None], offs_n[None, :], n, prefix, block_size, IS_CAUSAL, HAS_PREFIX)
        s = tl.where(vis, s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, lo, hi, offs_m, offs_d,
               skn, skd, svn, svd, n, prefix, block_size, qk_scale,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key tiles [lo, hi); only MASKED tiles pay for the mask."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = key_tile_scores(q, k_base, v_base, start_n, offs_m, offs_d, skn, skd, svn, svd, n, prefix,
                                  block_size, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, MASKED,
                                  DOT_PRECISION)
        # m_i is finite after the first tile (key 0 is visible to every query), so no -inf - -inf here.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, PREFIX,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N, N_BUCKET, block_size, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, batch * head). Writes O (B, H, N, D strides) and LSE (B, H, N) fp32.

    N_BUCKET (N rounded up to a power of two) is unused in the body: it is the autotuning key, so configs
    are tuned once per sequence band rather than once per N.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    o_base = O + b64 * sob + h64 * soh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, offs_m, N, offs_d, sqn, sqd, HEAD_D, BLOCK_D, True)
    if HAS_PREFIX:
        prefix = tl.load(PREFIX + b)
    else:
        prefix = 0

    full_end, hi = key_bounds(m0, N, prefix, block_size, BLOCK_M, IS_CAUSAL)
    n_full = (full_end // BLOCK_N) * BLOCK_N  # whole tiles below full_end; the rest of the band is masked

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, 0, n_full, offs_m, offs_d,
                               skn, skd, svn, svd, N, prefix, block_size, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, False, DOT_PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, n_full, hi, offs_m, offs_d,
                               skn, skd, svn, svd, N, prefix, block_size, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PREFIX, True, DOT_PRECISION)

    o = acc / l_i[:, None]
    store_rows(o_base, o.to(O.dtype.element_ty), offs_m, N, offs_d, son, sod, HEAD_D)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)
