"""The work the varlen attention kernels issue for a pack, counted from the lengths alone, vs its minimum.

``varlen_attention_cost(lengths, ...)`` walks the tiles the launchers of aimkern/ops/attention_varlen.py
launch on the GPU (the first config of each varlen Choice, the sm_90a or sm_80 table), with the kernels'
own tile rules (query split at 64, 16-row query tails, 16-key band ends, the backward's <= 32-key tail,
skipped invisible tiles), and adds up each ``tl.dot``'s M x N x K multiply-adds as they are issued: padded
tile shapes count in full. tests/test_attention_varlen_cost.py holds it equal to what the interpreted
kernels issue (``aimkern.ops._counting.count_work`` under ``gpu_configs()``).

The minimum is the dense cost report's: 2 V D multiply-adds forward and 5 V D backward, V the visible
(query, key) pairs of every sequence's mask. Everything is per head (H scales both alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..ops._launch import kernels

PerSequence = Union[None, int, Sequence[int]]


@dataclass(frozen=True)
class VarlenCost:
    """Per-head work of one pack: issued multiply-adds and tiles, and the visible pairs they must cover."""

    head_dim: int
    visible_pairs: int
    fwd_macs: int
    bwd_macs: int
    fwd_tiles: int  # (query tile, key tile) blocks the forward computes
    bwd_tiles: int  # (key tile, query tile) blocks the backward computes

    @property
    def min_fwd_macs(self) -> int:
        return 2 * self.visible_pairs * self.head_dim

    @property
    def min_bwd_macs(self) -> int:
        return 5 * self.visible_pairs * self.head_dim

    @property
    def fwd_x(self) -> float:
        """Issued forward work as a multiple of the minimum."""
        return self.fwd_macs / max(1, self.min_fwd_macs)

    @property
    def bwd_x(self) -> float:
        return self.bwd_macs / max(1, self.min_bwd_macs)

    @property
    def total_x(self) -> float:
        """Forward + backward issued over forward + backward minimum."""
        return (self.fwd_macs + self.bwd_macs) / max(1, self.min_fwd_macs + self.min_bwd_macs)


def _values(value: PerSequence, s: int, default: int, name: str) -> list:
    if value is None:
        return [default] * s
    if isinstance(value, int):
        return [value] * s
    values = [int(v) for v in value]
    if len(values) != s:
        raise ValueError(f"varlen_attention_cost: {name} has {len(values)} values for {s} sequences")
    return values


def visible_pairs(n: int, is_causal: bool, block_size: int, prefix: int) -> int:
    """Visible (query, key) pairs of one sequence of n tokens: query i sees max(prefix, (i // b + 1) * b) keys
    (at most n) when causal, all n otherwise."""
    if not is_causal:
        return n * n
    i = torch.arange(n, dtype=torch.int64)
    seen = torch.maximum(torch.full_like(i, prefix), (i // block_size + 1) * block_size).clamp_max(n)
    return int(seen.sum())


def _key_bounds(m0, m_end, n, prefix, bs, block_m, causal):
    """kernels/attention_fwd.py key_bounds_rows."""
    if not causal:
        return n, n
    last_q = min(m0 + block_m, m_end) - 1
    return min(max(prefix, (m0 // bs + 1) * bs), n), min(max(prefix, (last_q // bs + 1) * bs), n)


def _query_bounds(n0, n, prefix, bs, block_n, causal):
    """kernels/attention_fwd.py query_bounds."""
    if not causal:
        return 0, 0
    last_k = min(n0 + block_n, n) - 1
    return (0 if n0 < prefix else (n0 // bs) * bs), (0 if last_k < prefix else (last_k // bs) * bs)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _forward(n, prefix, bs, causal, k, bd):
    """(macs, tiles) of one sequence's forward (main and tail kernels)."""
    quantum, key_tail = k.QUERY_TAIL_QUANTUM, kernels("attention_fwd").KEY_TAIL.value
    main = k.forward(bd, k.fp32, k.max_seqlen, k.arch).configs[0].kwargs
    tail = k.forward_tail(bd, k.fp32).configs[0].kwargs
    bm, bn = main["BLOCK_M"], main["BLOCK_N"]
    split = (n // quantum) * quantum
    split = n if split in (0, n) else split
    macs = tiles = 0
    for m0 in range(0, split, bm):
        full_end, hi = _key_bounds(m0, split, n, prefix, bs, bm, causal)
        n_full = (full_end // bn) * bn
        n_mid = n_full + ((hi - n_full) // bn) * bn
        tiles += n_mid // bn + _cdiv(hi - n_mid, key_tail)
        macs += 2 * bm * bd * (n_mid + _cdiv(hi - n_mid, key_tail) * key_tail)
    tm, tn = tail["BLOCK_M"], tail["BLOCK_N"]
    for m0 in range(split, n, tm):
        _, hi = _key_bounds(m0, n, n, prefix, bs, tm, causal)
        tiles += _cdiv(hi, tn)
        macs += 2 * tm * bd * _cdiv(hi, tn) * tn
    return macs, tiles


def _backward(n, prefix, bs, causal, k, bd):
    """(macs, tiles) of one sequence's backward (key-tail and tiled kernels; 5 dots a block)."""
    quantum = k.KEY_TAIL_QUANTUM
    k_end = (n // quantum) * quantum
    if not k.has_key_tail(bd) or k_end == 0 or n - k_end == 0 or n - k_end > k.KEY_TAIL_MAX:
        k_end = n
    macs = tiles = 0
    if k_end < n:
        ktile = k.KEY_TAIL_TILE
        tm = k.backward_key_tail(bd, k.fp32, k.arch).configs[0].kwargs["BLOCK_M"]
        for k0 in range(k_end, n, ktile):
            lo, _ = _query_bounds(k0, n, prefix, bs, ktile, causal)
            blocks = len(range((lo // tm) * tm, n, tm))
            tiles += blocks
            macs += 5 * tm * ktile * bd * blocks
    cfg = k.backward_tiled(bd, k.fp32, k.max_seqlen, k.arch).configs[0].kwargs
    bm, bn, qt = cfg["BLOCK_M"], cfg["BLOCK_N"], k.QUERY_TAIL.value
    m_split = (n // bm) * bm
    for n0 in range(0, k_end, bn):
        lo, _ = _query_bounds(n0, k_end, prefix, bs, bn, causal)
        main = len(range(min((lo // bm) * bm, m_split), m_split, bm))
        tail = len(range(max((lo // qt) * qt, m_split), n, qt))
        tiles += main + tail
        macs += 5 * bn * bd * (bm * main + qt * tail)
    return macs, tiles


class _Kernels:
    """The varlen kernel family plus the problem facts its Choices take."""

    def __init__(self, fp32: bool, max_seqlen: int, arch: int):
        self.family = kernels("attention_varlen")
        self.fp32, self.max_seqlen, self.arch = fp32, max_seqlen, arch

    def __getattr__(self, name):
        return getattr(self.family, name)


def varlen_attention_cost(lengths: Sequence[int], *, is_causal: bool = False, block_size: PerSequence = 1,
                          prefix_len: PerSequence = None, head_dim: int = 64, fp32: bool = False,
                          max_seqlen: Optional[int] = None, arch: int = 90) -> VarlenCost:
    """Per-head work of varlen attention over sequences of ``lengths``, with each sequence's mask
    (block_size and prefix_len: an int for all, or one int per sequence), on the GPU configs of ``arch``
    (90: H100 / H200, 80: A100) for 16-bit (or ``fp32``) inputs of ``head_dim``. ``max_seqlen`` (default:
    the longest length) only picks the configs, as the launchers' argument does."""
    lengths = [int(n) for n in lengths]
    s = len(lengths)
    blocks = _values(block_size, s, 1, "block_size")
    prefixes = _values(prefix_len, s, 0, "prefix_len")
    k = _Kernels(fp32, max(lengths, default=0) if max_seqlen is None else max_seqlen, arch)
    bd = k.block_d(head_dim)
    pairs = fwd = bwd = fwd_tiles = bwd_tiles = 0
    for n, bs, prefix in zip(lengths, blocks, prefixes):
        if n == 0:
            continue
        pairs += visible_pairs(n, is_causal, bs, prefix)
        macs, tiles = _forward(n, prefix, bs, is_causal, k, bd)
        fwd, fwd_tiles = fwd + macs, fwd_tiles + tiles
        macs, tiles = _backward(n, prefix, bs, is_causal, k, bd)
        bwd, bwd_tiles = bwd + macs, bwd_tiles + tiles
    return VarlenCost(head_dim=head_dim, visible_pairs=pairs, fwd_macs=fwd, bwd_macs=bwd, fwd_tiles=fwd_tiles,
                      bwd_tiles=bwd_tiles)
