"""Multi-head self-attention on `aimkern.attention`, with AIM's masks."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..functional import attention_qkvpacked, attention_varlen_qkvpacked


class Attention(nn.Module):
    """Self-attention over (B, N, dim) tokens: qkv linear, masked attention, output projection.

    Parameter names match timm's ``Attention`` (``qkv``, ``proj``). The packed (B, N, 3, H, D) qkv activation
    goes to ``attention_qkvpacked`` as is: the kernels read q, k, v through its strides, write the output in
    (B, N, H, D) order (the reshape to (B, N, dim) is free) and the qkv gradient as one packed tensor, so no
    permute, stack or contiguous copy is made, forward or backward.
    Mask defaults (``is_causal``, ``block_size``) are set at construction and can be overridden per call.

    Packed images (``aimkern.PackedImages``): with ``cu_seqlens`` given, x is (T, dim), the tokens of S images
    end to end, and the (T, 3, H, D) qkv goes to ``attention_varlen_qkvpacked`` (each image its own mask, no
    image sees another); ``max_seqlen`` is the host bound on the images' lengths and ``prefix_len`` (S,).
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
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            return self._forward_varlen(x, cu_seqlens, max_seqlen, prefix_len, is_causal, block_size)
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        o = attention_qkvpacked(  # (B, N, H, D)
            qkv,
            is_causal=self.is_causal if is_causal is None else is_causal,
            block_size=self.block_size if block_size is None else block_size,
            prefix_len=prefix_len,
            backend=self.backend,
        )
        return self.proj(o.reshape(b, n, c))

    def _forward_varlen(self, x, cu_seqlens, max_seqlen, prefix_len, is_causal, block_size) -> torch.Tensor:
        t, c = x.shape
        qkv = self.qkv(x).view(t, 3, self.num_heads, self.head_dim)
        o = attention_varlen_qkvpacked(  # (T, H, D)
            qkv, cu_seqlens, max_seqlen=max_seqlen,
            is_causal=self.is_causal if is_causal is None else is_causal,
            block_size=self.block_size if block_size is None else block_size,
            prefix_len=prefix_len,
            backend=self.backend,
        )
        return self.proj(o.reshape(t, c))
