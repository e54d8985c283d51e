"""Apple's ml-aim attention (AIMv1 and AIMv2) on aimkern's attention, weights kept.

ml-aim's ``aim.v1.torch.layers.Attention`` (AIMv2 imports the same class) runs
``F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, attn_mask=mask)``; its subclass
``PrefixCausalAttention`` takes AIM's (B, N) boolean prefix mask (True = not prefix), ORs it with a stored
causal (1, N, N) mask and passes the dense (B, 1, N, N) result to the same call. ``MlAimAttention`` adopts
the module's ``qkv``, ``proj`` and dropouts (the same parameter objects, so ``state_dict`` keys are
unchanged) and converts the host's mask arguments into aimkern's options, so nothing N x N is built:

* ``PrefixCausalAttention``: the (B, N) mask becomes ``prefix_len = (~mask).sum(1)``, token-causal (or
  ``block_size`` from ``aimkern.patch``);
* ``Attention`` with ``mask=None``: the module's own ``is_causal`` (or ``aimkern.patch``'s options);
* ``Attention`` with a dense boolean mask: recognised as full / causal / block-causal / prefix-causal
  (``aimkern.integrations.masks``), a ValueError otherwise.

The classes are recognised by module and name, so ml-aim need not be importable when aimkern is.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..functional import attention_qkvpacked
from .masks import options_from_dense, prefix_from_ml_aim_mask

MODULES = ("aim.v1.torch.layers", "aim.v2.torch.layers")
CLASSES = ("Attention", "PrefixCausalAttention")


def is_ml_aim_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ in MODULES and cls.__name__ in CLASSES


class MlAimAttention(nn.Module):
    """ml-aim's ``Attention`` / ``PrefixCausalAttention`` forward with aimkern's attention as its core.

    ``is_causal``, ``block_size``, ``prefix_len`` (None: the host's own) and ``backend`` are attributes set by
    ``aimkern.patch``; the host's ``mask`` argument, when given, decides the mask of that call.
    """

    def __init__(self, src: nn.Module, *, is_causal: Optional[bool], block_size: Optional[int], prefix_len,
                 backend: str):
        super().__init__()
        self.kind = type(src).__name__
        self.num_heads = src.num_heads
        self.host_is_causal = bool(src.is_causal)
        for name in ("qkv", "attn_drop", "proj", "proj_drop"):
            self.add_module(name, getattr(src, name))
        self.is_causal, self.block_size, self.prefix_len, self.backend = is_causal, block_size, prefix_len, backend

    def _options(self, mask: Optional[torch.Tensor], b: int, n: int) -> tuple:
        where = f"aimkern.patch (ml-aim {self.kind})"
        block = 1 if self.block_size is None else self.block_size
        if self.kind == "PrefixCausalAttention":
            if mask is None:
                raise ValueError(f"{where}: a mask is required for the PrefixLM causal attention (as in ml-aim)")
            return True, block, prefix_from_ml_aim_mask(mask, n, where)
        if mask is not None:
            if self.host_is_causal:  # SDPA refuses is_causal with attn_mask; so does the patched module
                raise ValueError(f"{where}: a mask was given to an is_causal=True attention")
            return options_from_dense(mask, n, b, where)
        causal = self.host_is_causal if self.is_causal is None else self.is_causal
        return causal, block, self.prefix_len

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); ``mask`` as ml-aim's module takes it."""
        b, n, c = x.shape
        is_causal, block_size, prefix_len = self._options(mask, b, n)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        o = attention_qkvpacked(qkv, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len,
                                backend=self.backend)
        return self.proj_drop(self.proj(o.reshape(b, n, c)))

    def extra_repr(self) -> str:
        return (f"ml-aim {self.kind}, heads={self.num_heads}, host_is_causal={self.host_is_causal}, "
                f"is_causal={self.is_causal}, block_size={self.block_size}, backend={self.backend!r}")
