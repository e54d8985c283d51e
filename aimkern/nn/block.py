"""Pre-norm transformer blocks: the trunk's attention block and the heads' MLP-only block."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .attention import Attention


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)). Layers are built by the caller and injected.

    x is (B, N, dim), or (T, dim) packed images with ``cu_seqlens`` / ``max_seqlen`` (``Attention``)."""

    def __init__(self, attn: Attention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module):
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        prefix_len: Union[None, int, torch.Tensor] = None,
        is_causal: Optional[bool] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        varlen = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        x = x + self.attn(self.norm1(x), prefix_len=prefix_len, is_causal=is_causal, **varlen)
        return x + self.mlp(self.norm2(x))


class MlpBlock(nn.Module):
    """x + mlp(norm(x)): the block of AIM's MLP-only prediction head (no token mixing)."""

    def __init__(self, mlp: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))
