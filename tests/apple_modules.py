"""Minimal re-implementations of Apple's attention modules, for tests only (ml-aim and ml-l3m are not
installable in CI). Each mirrors its source's parameters and forward line for line; tests/test_patch_apple.py
first checks them against the golden outputs and gradients of the real code (tests/fixtures/apple/), then uses
them as the unpatched reference. Their ``__module__`` is the source's, because aimkern.patch recognises the
classes by module and name.

Sources: apple/ml-aim ``aim-v1/aim/v1/torch/layers.py`` (``Attention``, ``PrefixCausalAttention``);
apple/ml-l3m ``src/l3m/model/layers/attention.py`` (``GenericAttention``, its SDPA and BlockMask paths).
"""
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, use_bias: bool = True, is_causal: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=use_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, attn_mask=mask)
        x = x.transpose(1, 2).contiguous().reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class PrefixCausalAttention(Attention):
    def __init__(self, *args: Any, num_patches: int = 256, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("attn_mask", torch.ones(1, num_patches, num_patches, dtype=torch.bool).tril(diagonal=0))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        assert mask is not None, "A mask is required for the PrefixLM Causal Attention."
        B, N, C = x.shape
        prefix_mask = (~mask).unsqueeze(1).expand(-1, N, -1).bool()
        attn_mask = self.attn_mask.clone().expand(B, -1, -1)
        attn_mask = torch.logical_or(attn_mask, prefix_mask)
        attn_mask = attn_mask.unsqueeze(1)  # (B, 1, N, N)
        return super().forward(x, mask=attn_mask, **kwargs)


Attention.__module__ = PrefixCausalAttention.__module__ = "aim.v1.torch.layers"


class GenericAttention(nn.Module):
    def __init__(self, dim: int, head_dim: Optional[int] = None, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 use_bias: bool = True, is_causal: bool = False, num_kv_heads: Optional[int] = None,
                 rope: Optional[nn.Module] = None, qk_norm=None, use_flex_attention: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        if not head_dim:
            head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.q_proj = nn.Linear(dim, head_dim * self.num_heads, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, head_dim * self.num_kv_heads, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, head_dim * self.num_kv_heads, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(head_dim * self.num_heads, dim, bias=use_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.q_norm = qk_norm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm(head_dim) if qk_norm else nn.Identity()
        self.is_causal = is_causal
        self.rope = rope
        self.attention_fn = None
        if use_flex_attention:
            from torch.nn.attention.flex_attention import flex_attention

            self.attention_fn = flex_attention  # l3m compiles it; eager computes the same

    def repeat_kv(self, hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
        batch, num_kv_heads, slen, head_dim = hidden_states.shape
        if n_rep == 1:
            return hidden_states
        hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv_heads, n_rep, slen, head_dim)
        return hidden_states.reshape(batch, num_kv_heads * n_rep, slen, head_dim)

    def forward(self, x: torch.Tensor, mask=None, position_ids: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask

        B, N, C = x.shape
        if mask is not None:
            assert not self.is_causal, "Mask was provided but the attention is causal."
            if not isinstance(mask, BlockMask):
                mask = mask.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, N, self.num_kv_heads, -1).permute(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, N, self.num_kv_heads, -1).permute(0, 2, 1, 3)
        k = self.repeat_kv(k, self.num_kv_groups)
        v = self.repeat_kv(v, self.num_kv_groups)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k, v = self.rope(q, k, v, position_ids=position_ids)
        if isinstance(mask, BlockMask):
            assert self.attention_fn is not None, "BlockMask was given but use_flex_attention was not set to True."
            x = self.attention_fn(q, k, v, block_mask=mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, attn_mask=mask,
                                               dropout_p=self.attn_drop)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


GenericAttention.__module__ = "l3m.model.layers.attention"
