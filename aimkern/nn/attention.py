"""Multi-head self-attention on `aimkern.attention`, with AIM's masks."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..ops.attention import attention


class Attention(nn.Module):
    """Self-attention over (B, N, dim) tokens: qkv linear, masked attention, output projection.

    Parameter names match timm's ``Attention`` (``qkv``, ``proj``). q, k and v are passed to the kernel as
    strided views of the packed (B, N, 3, H, D) qkv activation: no permute or contiguous copy is made.
    Mask defaults (``is_causal``, ``block_size``) are set at construction and can be overridden per call.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        is_causal: bool = False,
        block_size: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_causal = is_causal
        self.block_size = block_size
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        prefix_len: Union[None, int, torch.Tensor] = None,
        is_causal: Optional[bool] = None,
        block_size: Optional[int] = None,
    ) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views
        o = attention(
            q,
            k,
            v,
            is_causal=self.is_causal if is_causal is None else is_causal,
            block_size=self.block_size if block_size is None else block_size,
            prefix_len=prefix_len,
            backend=self.backend,
        )
        return self.proj(o.transpose(1, 2).reshape(b, n, c))
