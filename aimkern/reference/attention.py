"""Plain-PyTorch reference of `aimkern.attention`: the definition of what the kernels compute."""
from __future__ import annotations

from typing import Optional

import torch


def attention_mask(
    n: int,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Optional[torch.Tensor] = None,
    batch: int = 1,
    device=None,
) -> torch.Tensor:
    """Boolean visibility mask, True where query i may attend to key j. Shape (B, 1, N, N).

    Query i sees key j when ``j < prefix_len[b]``, or when not ``is_causal``, or when
    ``j // block_size <= i // block_size``. Example, N = 6, block_size = 2, prefix_len = 3
    (rows are queries, columns keys; x = visible)::

        x x x . . .
        x x x . . .
        x x x x . .
        x x x x . .
        x x x x x x
        x x x x x x
    """
    i = torch.arange(n, device=device).view(n, 1)
    j = torch.arange(n, device=device).view(1, n)
    if is_causal:
        visible = (j // block_size) <= (i // block_size)
    else:
        visible = torch.ones(n, n, dtype=torch.bool, device=device)
    visible = visible.view(1, 1, n, n).expand(batch, 1, n, n)
    if prefix_len is not None:
        in_prefix = j.view(1, 1, 1, n) < prefix_len.view(-1, 1, 1, 1).to(device)
        visible = visible | in_prefix
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q, k, v of shape (B, H, N, D); returns (B, H, N, D) in q's dtype.

    Computed in float32 for half inputs (float64 stays float64). Every query sees at least itself, so no
    row of the mask is empty.
    """
    b, _, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bhid,bhjd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale
    if is_causal or prefix_len is not None:
        mask = attention_mask(n, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, batch=b, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhij,bhjd->bhid", p, v.to(compute_dtype))
    return o.to(q.dtype)
