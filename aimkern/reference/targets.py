"""Which next-patch targets count: the one rule of AIM's objective, for the pixel and the token heads.

Row i of the features predicts patch j = i + offset. Target j counts when j >= offset (a patch with no row
before it) and j >= prefix_len[b] (AIM's prefix patches are context, never targets).
"""
from __future__ import annotations

from typing import Union

import torch

PrefixLen = Union[None, int, torch.Tensor]


def _as_tensor(prefix_len: PrefixLen, device) -> torch.Tensor:
    # A tensor is used as it is (no copy, nothing new for torch.compile to trace); an int becomes one.
    return prefix_len if isinstance(prefix_len, torch.Tensor) else torch.tensor(prefix_len, device=device)


def target_mask(batch: int, n: int, offset: int, prefix_len: PrefixLen, device) -> torch.Tensor:
    """(B, N) bool: target patch j counts when j >= offset and j >= prefix_len[b] (``prefix_len``: None, an
    int for every image, or a (B,) tensor). ``[:, offset:]`` lines it up with the N - offset predictions."""
    j = torch.arange(n, device=device).view(1, n)
    counted = (j >= offset).expand(batch, n)
    if prefix_len is not None:
        counted = counted & (j >= _as_tensor(prefix_len, device).view(-1, 1).to(device))
    return counted


def counted_targets(batch: int, n: int, offset: int, prefix_len: PrefixLen = None, device=None) -> torch.Tensor:
    """(B,) int64: how many targets of each image count, #{j < N : j >= offset and j >= prefix_len[b]}.

    The closed form of ``target_mask(...).sum(1)``, for callers that need only the count (a loss's mean).
    """
    device = prefix_len.device if isinstance(prefix_len, torch.Tensor) else device
    first = torch.full((batch,), offset, dtype=torch.int64, device=device)
    if prefix_len is not None:
        first = torch.maximum(first, _as_tensor(prefix_len, device).to(torch.int64))
    return (n - first).clamp_min(0)
