"""`aimkern.patch_timm`: run a timm VisionTransformer (AIMv2 included) on aimkern's attention, weights kept.

Every timm ``Attention`` module of the model is replaced, in place, by a ``TimmAttention`` that adopts the
original's submodules under the same names (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``,
dropouts), so parameters are the same objects, ``state_dict`` keys are unchanged and pretrained
checkpoints still load. Only the attention core changes: ``aimkern.attention`` with the chosen mask,
reading q, k, v as strided views of the packed qkv and handing back (B, N, H, D) memory for the output
projection, with no copies.

The mask applies to the token sequence as timm orders it: class / register tokens (``num_prefix_tokens``)
first, then patches in raster order. ``prefix_len=model.num_prefix_tokens`` lets every token see them.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..ops._checks import check_backend_name
from ..ops.attention import AttentionParams, attention


def _timm_attention_classes() -> tuple:
    """timm's plain multi-head self-attention class(es): timm.layers.Attention (timm >= 1.0.2x) and the one
    vision_transformer uses (older releases defined it there)."""
    classes = []
    try:
        from timm.layers import Attention as layers_attention

        classes.append(layers_attention)
    except ImportError:
        pass
    try:
        from timm.models.vision_transformer import Attention as vit_attention

        classes.append(vit_attention)
    except ImportError:
        pass
    if not classes:
        raise ImportError("patch_timm: timm is not installed (pip install timm)")
    return tuple(dict.fromkeys(classes))


class TimmAttention(nn.Module):
    """timm's ``Attention`` forward with ``aimkern.attention`` as its core; built from an existing module.

    Mask options (``is_causal``, ``block_size``, ``prefix_len``, ``backend``) are attributes: reassign them
    (or call ``patch_timm`` again) to change the mask, e.g. a new per-sample ``prefix_len`` each batch.
    """

    def __init__(self, src: nn.Module, *, is_causal: bool, block_size: int, prefix_len, backend: str):
        super().__init__()
        self.num_heads = src.num_heads
        self.head_dim = src.head_dim
        self.attn_dim = getattr(src, "attn_dim", src.num_heads * src.head_dim)
        self.scale = getattr(src, "scale", self.head_dim**-0.5)
        for name, child in src.named_children():  # the same module objects: weights kept, names unchanged
            self.add_module(name, child)
        for name, param in src.named_parameters(recurse=False):
            self.register_parameter(name, param)
        if not hasattr(self, "gate"):  # timm versions without the gated variant
            self.gate = None
        self.is_causal, self.block_size, self.prefix_len, self.backend = is_causal, block_size, prefix_len, backend

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **kwargs) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C_out). ``is_causal=True`` from timm's call adds token causality."""
        if attn_mask is not None:
            raise ValueError(
                "patch_timm: an explicit attn_mask is not supported by aimkern attention; express the mask "
                "with patch_timm(model, is_causal=..., block_size=..., prefix_len=...) instead"
            )
        attn_drop = getattr(self, "attn_drop", None)
        if self.training and attn_drop is not None and getattr(attn_drop, "p", 0.0) > 0:
            raise ValueError(
                f"patch_timm: attention dropout (p={attn_drop.p}) is not supported by aimkern attention; "
                "build the model with attn_drop_rate=0 or use eval()"
            )
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # strided views of the packed activation: no copies
        q = self.q_norm(q) if hasattr(self, "q_norm") else q
        k = self.k_norm(k) if hasattr(self, "k_norm") else k
        o = attention(
            q, k, v, is_causal=self.is_causal or bool(is_causal), block_size=self.block_size,
            prefix_len=self.prefix_len, scale=self.scale, backend=self.backend,
        )
        x = o.transpose(1, 2).reshape(b, n, self.attn_dim)  # o is (B, N, H, D) memory: a free reshape
        if hasattr(self, "norm"):
            x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        if hasattr(self, "proj_drop"):
            x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, is_causal={self.is_causal}, "
                f"block_size={self.block_size}, prefix_len={'tensor' if torch.is_tensor(self.prefix_len) else self.prefix_len}, "
                f"backend={self.backend!r}")


def _check_options(is_causal, block_size, prefix_len, backend) -> None:
    AttentionParams(is_causal=is_causal, block_size=block_size).check("patch_timm")
    if prefix_len is not None and (isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor))):
        raise TypeError(f"patch_timm: prefix_len must be None, an int or a (B,) int tensor, got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int) and prefix_len < 0:
        raise ValueError(f"patch_timm: prefix_len must be >= 0, got {prefix_len}")
    check_backend_name(backend, "patch_timm")


def patch_timm(
    model: nn.Module,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    backend: str = "auto",
) -> nn.Module:
    """Swap every timm ``Attention`` in ``model`` for aimkern's, in place; returns ``model``.

    Args:
        model: a timm model whose blocks use ``timm.layers.Attention`` (VisionTransformer, AIMv2, ...).
        is_causal, block_size, prefix_len: the mask, as in ``aimkern.attention``, over the model's token
            sequence (class / register tokens first). A prefix_len tensor must have shape (B,) of each batch.
        backend: "auto" | "triton" | "reference", as in ``aimkern.attention``.

    Already patched modules get the new options, so calling it again changes the mask. Raises ValueError
    when the model has no timm attention module to swap.
    """
    _check_options(is_causal, block_size, prefix_len, backend)
    classes = _timm_attention_classes()
    opts = dict(is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, backend=backend)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TimmAttention):
                for key, value in opts.items():
                    setattr(child, key, value)
                swapped += 1
            elif type(child) in classes:  # exact type: subclasses (rope, ...) change the forward we mirror
                setattr(parent, name, TimmAttention(child, **opts))
                swapped += 1
    if swapped == 0:
        raise ValueError(
            f"patch_timm: found no timm Attention module in {type(model).__name__}; expected a timm "
            "VisionTransformer-style model (blocks with timm.layers.Attention)"
        )
    return model
