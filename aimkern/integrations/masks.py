"""Host attention masks -> aimkern's mask options (``is_causal``, ``block_size``, ``prefix_len``).

aimkern's masks are options, not tensors: query i sees key j when ``j < prefix_len[b]``, or when not
``is_causal``, or when ``j // block_size <= i // block_size``. Every such mask has rows that are prefixes of
the keys: row i of sample b sees exactly keys ``[0, c[b, i])`` with
``c[b, i] = max(prefix_len[b], min(N, (i // block_size + 1) * block_size))``. ``options_from_dense`` checks
that a boolean mask has that shape (rows non-increasing along the keys, counts of that form) and returns the
options; any other mask is a ValueError, never an approximation. It reads the mask the host already built
and builds no N x N tensor of its own beyond one comparison of neighbouring columns.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

PrefixLen = Union[None, int, torch.Tensor]


def prefix_from_ml_aim_mask(mask: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """ml-aim's (B, N) prefix mask (True = not prefix) -> the (B,) int64 prefix lengths. The prefix must be
    the leading tokens (False then True along N), as ml-aim's prefix sampling makes it."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != n:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{where}: mask must be ml-aim's (B, N={n}) prefix mask (True = not prefix), got {shape}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be a bool tensor (True = not prefix), got {mask.dtype}")
    if n > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(f"{where}: the prefix mask's prefix must be the leading tokens (False ... False True ... "
                         "True in every row); an interleaved prefix has no prefix-causal equivalent")
    return (~mask).sum(dim=1)


def _as_bnn(mask: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """A boolean SDPA-style mask of shape (N, N), (B, N, N), (B, 1, N, N) or (B, H, N, N) with equal heads,
    as (B', N, N) (B' = 1 when it broadcasts over the batch)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a boolean tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}: only boolean masks (True = attend) can run on aimkern attention, got "
                         f"{mask.dtype} (an additive float mask or bias has no equivalent)")
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (n, n):
        raise ValueError(f"{where}: mask must be (N, N), (B, N, N) or (B, H, N, N) with N={n}, got "
                         f"{tuple(mask.shape)}")
    if mask.dim() == 4:
        if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
            raise ValueError(f"{where}: a mask that differs between heads has no aimkern equivalent")
        mask = mask[:, 0]
    return mask.reshape(-1, n, n)


def _divisors(g: int) -> list:
    small = [d for d in range(1, math.isqrt(g) + 1) if g % d == 0]
    return sorted(set(small + [g // d for d in small]), reverse=True)


def options_from_dense(mask: torch.Tensor, n: int, batch: int, where: str) -> Tuple[bool, int, PrefixLen]:
    """(is_causal, block_size, prefix_len) equal to a boolean attention ``mask`` over ``n`` tokens (see the
    module docstring); a ValueError when the mask is not prefix-causal, block-causal, causal or full."""
    m = _as_bnn(mask, n, where)
    if m.shape[0] not in (1, batch):
        raise ValueError(f"{where}: mask batch {m.shape[0]} does not match the input batch {batch}")
    if bool(m.all()):
        return False, 1, None
    if n > 1 and bool((~m[..., :-1] & m[..., 1:]).any()):
        raise ValueError(f"{where}: the mask is not prefix-causal or block-causal (a row sees a key after one "
                         "it does not see); express it with aimkern.patch(is_causal=, block_size=, prefix_len=) "
                         "or keep the host's attention")
    counts = m.sum(dim=-1)  # (B', N): row i sees keys [0, counts[i])
    i = torch.arange(n, device=counts.device)
    if bool((counts <= i).any()):
        raise ValueError(f"{where}: the mask hides a query from itself (a row that does not see its own key); "
                         "aimkern's masks always let a token see itself")
    # The counts change only where a new causal block starts (i a multiple of the block size), and a row that
    # sees exactly keys [0, i] ends one (i + 1 a multiple): the block size divides all of them. The counts of a
    # mask that is not full change at least once (the last row sees every key, the first one does not).
    starts = torch.nonzero(counts[:, 1:] != counts[:, :-1])[:, 1] + 1
    ends = torch.nonzero(counts[:, :-1] == i[:-1] + 1)[:, 1] + 1
    multiples = sorted(set(starts.tolist()) | set(ends.tolist()))
    candidates = _divisors(math.gcd(*multiples)) if multiples else [1]
    for bs in candidates:
        prefix = counts[:, 0]  # max(prefix, block_size): the same mask as the true prefix
        blocks = torch.clamp((i // bs + 1) * bs, max=n)
        if torch.equal(counts, torch.maximum(prefix[:, None], blocks[None, :])):
            prefix = prefix.expand(batch) if prefix.shape[0] == 1 else prefix
            return True, bs, prefix.to(torch.int64)
    raise ValueError(f"{where}: the mask is not prefix-causal or block-causal (its row counts fit no block size); "
                     "express it with aimkern.patch(is_causal=, block_size=, prefix_len=) or keep the host's "
                     "attention")


def options_from_block_mask(block_mask, n: int, batch: int, device, where: str) -> Tuple[bool, int, PrefixLen]:
    """The options of a FlexAttention ``BlockMask``: its ``mask_mod`` is evaluated on the (B, N, N) grid (as
    ``create_block_mask`` itself does when the host builds it) and recognised like a dense mask."""
    from torch.nn.attention.flex_attention import create_mask

    b = block_mask.shape[0] if block_mask.shape[0] in (1, batch) else batch
    dense = create_mask(block_mask.mask_mod, b, 1, n, n, device=device)
    return options_from_dense(dense, n, batch, where)
