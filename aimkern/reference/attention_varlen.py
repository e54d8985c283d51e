"""Plain-PyTorch reference of varlen attention: sequence by sequence through the dense reference.

q, k, v are (T, H, D): the tokens of S sequences laid end to end, sequence s holding tokens
[cu_seqlens[s], cu_seqlens[s + 1]). Query i of sequence s sees key j of the same sequence under the dense
rule with s's own block size and prefix, and no key of another sequence.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .attention import attention_reference

PerSequence = Union[None, int, torch.Tensor]


def sequence_bounds(cu_seqlens: torch.Tensor) -> list:
    """[(start, end)] of every sequence, read on the host (cu_seqlens (S + 1,) integer)."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:]))


def per_sequence(value: PerSequence, s: int, name: str) -> Optional[list]:
    """None, or the S ints of an int or an (S,) integer tensor (a host read)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.shape != (s,):
            raise ValueError(f"{name} must be an int or a tensor of shape (S,) = ({s},), got {tuple(value.shape)}")
        return [int(x) for x in value.tolist()]
    return [int(value)] * s


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: PerSequence = 1,
    prefix_len: PerSequence = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``attention_reference`` on each sequence alone; returns (T, H, D) in q's dtype.

    block_size: an int or an (S,) int tensor (sequence s's causal block); prefix_len: None, an int or an
    (S,) int tensor. Differentiable in q, k and v. Sequences of length 0 are allowed (they hold no token).
    """
    bounds = sequence_bounds(cu_seqlens)
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != q.shape[0] or any(b < a for a, b in bounds):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={q.shape[0]}, got {cu_seqlens.tolist()}")
    blocks = per_sequence(block_size, len(bounds), "block_size")
    prefixes = per_sequence(prefix_len, len(bounds), "prefix_len")
    outs = []
    for s, (a, b) in enumerate(bounds):
        if b == a:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, n, D)
        prefix = None if prefixes is None else torch.tensor([prefixes[s]], device=q.device)
        o = attention_reference(qs, ks, vs, is_causal=is_causal, block_size=blocks[s], prefix_len=prefix,
                                scale=scale)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, dim=0)


def varlen_mask(cu_seqlens: torch.Tensor, t: int, *, is_causal: bool = False, block_size: PerSequence = 1,
                prefix_len: PerSequence = None) -> torch.Tensor:
    """(T, T) bool, built on the device without reading values back: query i sees key j when both are in
    the same sequence s and, with local positions i', j', j' < prefix_len[s], or not is_causal, or
    j' // block_size[s] <= i' // block_size[s]. The block-diagonal mask of a pack (the dense-mask paths)."""
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(t, device=device)
    seq = torch.searchsorted(cu[1:], pos, right=True).clamp_max(cu.numel() - 2)  # the sequence of each token
    local = pos - cu[seq]
    mask = seq[:, None] == seq[None, :]
    if not is_causal:
        return mask
    if isinstance(block_size, torch.Tensor):
        b = block_size.to(device=device, dtype=torch.int64)[seq][:, None]
    else:
        b = int(block_size)
    vis = (local[None, :] // b) <= (local[:, None] // b)
    if prefix_len is not None:
        p = prefix_len.to(device=device, dtype=torch.int64)[seq] if isinstance(prefix_len, torch.Tensor) else prefix_len
        vis = vis | (local[None, :] < (p[:, None] if isinstance(p, torch.Tensor) else p))
    return mask & vis
