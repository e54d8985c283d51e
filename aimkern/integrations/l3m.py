"""Apple's ml-l3m ``GenericAttention`` on aimkern's attention, weights kept.

ml-l3m's ``l3m.model.layers.attention.GenericAttention`` projects q, k, v with three linears (grouped kv heads
allowed), applies its optional q/k norm and RoPE, then runs SDPA (``is_causal=self.is_causal`` or a dense
``mask`` (B, N, N), True = attend, with ``dropout_p=self.attn_drop``) or, given a FlexAttention ``BlockMask``,
its compiled ``flex_attention``. ``L3mAttention`` adopts its submodules (same parameters and names) and runs
the same steps with aimkern's attention as the core:

* no mask: l3m's ``is_causal`` flag is kept (``aimkern.patch(is_causal=...)`` overrides it);
* a dense boolean mask: recognised as full / causal / block-causal / prefix-causal, a ValueError otherwise;
* a ``BlockMask``: its ``mask_mod`` is evaluated and recognised the same way.

Grouped kv heads are repeated as l3m does. ``attn_drop > 0`` is a ValueError (aimkern has no attention
dropout); l3m passes it to SDPA in eval mode too, so a model with it was never deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..functional import attention
from .masks import options_from_block_mask, options_from_dense

MODULE, CLASS = "l3m.model.layers.attention", "GenericAttention"


def is_l3m_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == MODULE and cls.__name__ == CLASS


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod")


class L3mAttention(nn.Module):
    """ml-l3m's ``GenericAttention`` forward with aimkern's attention; options as ``MlAimAttention``'s."""

    def __init__(self, src: nn.Module, *, is_causal: Optional[bool], block_size: Optional[int], prefix_len,
                 backend: str):
        super().__init__()
        if float(src.attn_drop) > 0:
            raise ValueError(f"aimkern.patch: l3m GenericAttention has attn_drop={src.attn_drop}; aimkern attention "
                             "has no dropout (build the model with attn_drop=0)")
        self.num_heads, self.num_kv_heads = src.num_heads, src.num_kv_heads
        self.num_kv_groups = src.num_kv_groups
        self.host_is_causal = bool(src.is_causal)
        for name in ("q_proj", "k_proj", "v_proj", "proj", "proj_drop", "q_norm", "k_norm"):
            self.add_module(name, getattr(src, name))
        self.rope = src.rope
        self.attn_drop = 0.0
        self.is_causal, self.block_size, self.prefix_len, self.backend = is_causal, block_size, prefix_len, backend

    def _options(self, mask, b: int, n: int, device) -> tuple:
        where = "aimkern.patch (l3m GenericAttention)"
        if mask is not None:
            if self.host_is_causal:
                raise ValueError(f"{where}: a mask was provided but the attention is causal (as l3m asserts)")
            if _is_block_mask(mask):
                return options_from_block_mask(mask, n, b, device, where)
            return options_from_dense(mask, n, b, where)
        causal = self.host_is_causal if self.is_causal is None else self.is_causal
        return causal, 1 if self.block_size is None else self.block_size, self.prefix_len

    @staticmethod
    def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
        if n_rep == 1:
            return t
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)

    def forward(self, x: torch.Tensor, mask=None, position_ids: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); ``mask`` and ``position_ids`` as l3m's module takes them."""
        b, n, _c = x.shape
        is_causal, block_size, prefix_len = self._options(mask, b, n, x.device)
        q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)  # (B, H, N, D) views
        k = self.k_proj(x).reshape(b, n, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, -1).transpose(1, 2)
        k, v = self._repeat_kv(k, self.num_kv_groups), self._repeat_kv(v, self.num_kv_groups)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k, v = self.rope(q, k, v, position_ids=position_ids)
        o = attention(q, k, v, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len,
                      backend=self.backend)  # SDPA's default scale, as l3m's call
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, -1)))

    def extra_repr(self) -> str:
        return (f"l3m GenericAttention, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"host_is_causal={self.host_is_causal}, is_causal={self.is_causal}, backend={self.backend!r}")
