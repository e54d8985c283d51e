"""``aimkern.patch``: swap the attention modules of timm, Apple's ml-aim and Apple's ml-l3m models for aimkern's.

One call, in place, weights kept (the new modules adopt the old ones' parameters under the same names):

* timm ``Attention`` -> ``aimkern.integrations.timm.TimmAttention`` (what ``patch_timm`` does);
* ml-aim ``Attention`` / ``PrefixCausalAttention`` (AIMv1 and AIMv2) -> ``aimkern.integrations.ml_aim``;
* ml-l3m ``GenericAttention`` -> ``aimkern.integrations.l3m``.

The patched modules honour the host's own mask arguments (ml-aim's (B, N) prefix mask, l3m's ``is_causal``,
dense boolean masks, FlexAttention BlockMasks), converted into aimkern's options. ``is_causal``,
``block_size`` and ``prefix_len`` given here apply where the host passes no mask; None keeps the host's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .integrations.l3m import L3mAttention, is_l3m_attention
from .integrations.ml_aim import MlAimAttention, is_ml_aim_attention
from .integrations.timm import TimmAttention, _check_options, _is_identity, _timm_attention_classes


def _timm_classes() -> tuple:
    try:
        return _timm_attention_classes()
    except ImportError:
        return ()


def patch(model: nn.Module, *, is_causal: Optional[bool] = None, block_size: Optional[int] = None,
          prefix_len: Union[None, int, torch.Tensor] = None, backend: str = "auto") -> nn.Module:
    """Swap every timm, ml-aim and ml-l3m attention module of ``model`` for aimkern's, in place; returns it.

    Args:
        model: any module tree holding such attention modules (ml-aim's ``AIM``, an l3m ``MetaModel``, a timm
            ViT, a wrapper of one).
        is_causal, block_size, prefix_len: the mask where the host gives none, as in ``aimkern.attention``
            (None: the host's own, e.g. l3m's ``is_causal`` flag; for timm modules None means full attention,
            block size 1, no prefix).
        backend: "auto" | "triton" | "reference".

    Patching again updates the options of already patched modules. A ValueError when nothing was found.
    """
    _check_options(bool(is_causal), 1 if block_size is None else block_size, prefix_len, backend, "aimkern.patch")
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"aimkern.patch: is_causal must be None or a bool, got {type(is_causal).__name__}")
    timm_classes = _timm_classes()
    if timm_classes:
        from .integrations.timm import _register_fx_leaf

        _register_fx_leaf()
    opts = dict(is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, backend=backend)
    timm_opts = dict(is_causal=bool(is_causal), block_size=1 if block_size is None else block_size,
                     prefix_len=prefix_len, backend=backend)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (MlAimAttention, L3mAttention)):
                for key, value in opts.items():
                    setattr(child, key, value)
            elif isinstance(child, TimmAttention):
                for key, value in timm_opts.items():
                    setattr(child, key, value)
                child.packed = _is_identity(child.q_norm) and _is_identity(child.k_norm)
            elif is_ml_aim_attention(child):
                setattr(parent, name, MlAimAttention(child, **opts))
            elif is_l3m_attention(child):
                setattr(parent, name, L3mAttention(child, **opts))
            elif type(child) in timm_classes:  # exact type, as patch_timm
                setattr(parent, name, TimmAttention(child, **timm_opts))
            else:
                continue
            swapped += 1
    if swapped == 0 and (is_ml_aim_attention(model) or is_l3m_attention(model) or type(model) in timm_classes):
        raise ValueError(f"aimkern.patch: model is itself a {type(model).__name__}; pass the model that holds it "
                         "(attention modules are swapped in place, inside their parent)")
    if swapped == 0:
        raise ValueError(f"aimkern.patch: found no timm, ml-aim or ml-l3m attention module in {type(model).__name__} "
                         "(timm.layers.Attention, aim.v1.torch.layers.Attention / PrefixCausalAttention, "
                         "l3m.model.layers.attention.GenericAttention)")
    return model
