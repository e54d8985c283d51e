"""`aimkern.integrations.transformers`: aimkern attention as a Hugging Face transformers attention implementation.

    from aimkern.integrations import transformers as aimkern_hf
    aimkern_hf.register(is_causal=True, block_size=14, prefix_len=1)          # once, before building models
    model = ViTModel.from_pretrained("google/vit-base-patch16-224", attn_implementation="aimkern")
    model = Dinov2Model._from_config(config, attn_implementation="aimkern")   # randomly initialized

transformers' vision models (ViT, DeiT, Dinov2, ...) pick their attention core through
``AttentionInterface``: the function gets ``(module, query, key, value, attention_mask, scaling=...,
dropout=..., **kwargs)`` with q, k, v in (B, H, N, D) and returns the (B, N, H, D) output. ``register``
adds one under the name "aimkern" (and the mask builder that goes with it), with the mask options fixed
at registration; call it again to change them. A per-call ``prefix_len=`` keyword reaching the attention
(models that forward ``**kwargs`` to their layers) overrides the registered one.

Supported: self-attention with equal q / k / v head counts, ``scaling``, and the masks of
``aimkern.attention``. A dense ``attention_mask`` (e.g. from a padding mask) is accepted only when it
equals the registered mask; anything else (padding, arbitrary biases) raises, as does dropout > 0 in
training, grouped-query attention and cross-attention (q and k of different lengths).

transformers is optional (``pip install -e ".[hf]"``): this module imports it only inside ``register``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..checks import check_backend_name
from ..functional import attention
from ..ops.attention import AttentionParams
from ..reference.attention import attention_mask as dense_visibility

NAME = "aimkern"


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """A transformers attention mask (bool: True = visible; float: additive, 0 = visible) as a bool mask."""
    if mask.dtype == torch.bool:
        return mask
    visible = mask == 0
    masked = mask <= torch.finfo(mask.dtype).min / 2  # -inf or transformers' dtype-min fill
    if not bool((visible | masked).all()):
        raise ValueError(
            "aimkern attention: the attention_mask carries an additive bias (values other than 0 and -inf); "
            "aimkern can only express visibility masks (full, causal, block-causal, prefix-causal)"
        )
    return visible


class AimkernAttention:
    """The function registered in transformers' ``AttentionInterface``; its mask options are fixed here.

    Called as ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with
    query, key, value (B, H, N, D); returns ``(output (B, N, H, D), None)`` (no attention weights).
    """

    def __init__(self, is_causal: bool = False, block_size: int = 1,
                 prefix_len: Union[None, int, torch.Tensor] = None, backend: str = "auto"):
        AttentionParams(is_causal=is_causal, block_size=block_size).check(NAME)
        check_backend_name(backend, NAME)
        self.is_causal, self.block_size, self.prefix_len, self.backend = is_causal, block_size, prefix_len, backend

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs) -> tuple:
        if dropout and dropout > 0:
            raise ValueError(
                f"aimkern attention: attention dropout (p={dropout}) is not supported; set the config's "
                "attention dropout (e.g. attention_probs_dropout_prob) to 0 or use model.eval()"
            )
        for name in ("softcap", "sliding_window", "position_bias", "s_aux"):
            if kwargs.get(name) is not None:
                raise ValueError(f"aimkern attention: {name} is not supported")
        if key.shape[1] != query.shape[1]:
            raise ValueError(
                f"aimkern attention: q has {query.shape[1]} heads but k / v have {key.shape[1]} "
                "(grouped-query attention is not supported)"
            )
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"aimkern attention: q has {query.shape[2]} tokens but k / v have {key.shape[2]}; only "
                "self-attention over one sequence is supported (no cross-attention or KV cache)"
            )
        # transformers' decoder layers flag causality themselves (kwarg or module.is_causal); vision encoders don't
        call_causal = kwargs.get("is_causal")
        is_causal = self.is_causal or bool(getattr(module, "is_causal", False) if call_causal is None else call_causal)
        prefix_len = kwargs.get("prefix_len", self.prefix_len)
        if attention_mask is not None:
            self._check_mask(attention_mask, query, is_causal, prefix_len)
        o = attention(query, key, value, is_causal=is_causal, block_size=self.block_size, prefix_len=prefix_len,
                      scale=scaling, backend=self.backend)
        return o.transpose(1, 2), None  # (B, N, H, D): contiguous on Triton (the kernels store that order)

    def _check_mask(self, mask: torch.Tensor, query: torch.Tensor, is_causal: bool, prefix_len) -> None:
        """Accept a dense mask only when it is the one aimkern computes anyway (a host sync: masks only)."""
        b, _, n, _ = query.shape
        if mask.dim() != 4 or mask.shape[-2:] != (n, n):
            raise ValueError(f"aimkern attention: expected a (B, 1, N, N) attention_mask, got {tuple(mask.shape)}")
        if isinstance(prefix_len, int):
            prefix_len = torch.full((b,), prefix_len, device=query.device)
        want = dense_visibility(n, is_causal=is_causal, block_size=self.block_size, prefix_len=prefix_len, batch=b,
                                device=query.device)
        if not torch.equal(*torch.broadcast_tensors(_visible(mask), want)):  # (B or 1, H or 1, N, N) masks
            raise ValueError(
                "aimkern attention: got a dense attention_mask (e.g. padding) that differs from the registered "
                f"mask (is_causal={is_causal}, block_size={self.block_size}, prefix_len={prefix_len!r}); aimkern "
                "cannot express it. Drop the mask or register(...) the mask you want"
            )


def register(is_causal: bool = False, block_size: int = 1, prefix_len: Union[None, int, torch.Tensor] = None,
             backend: str = "auto", name: str = NAME) -> AimkernAttention:
    """Register aimkern attention in transformers as ``attn_implementation=name`` (default "aimkern").

    Args:
        is_causal, block_size, prefix_len: the mask, as in ``aimkern.attention``, over the model's token
            sequence as the model orders it (ViT / Dinov2: the class token first, then patches in raster
            order, so ``prefix_len=1`` lets every token see the class token). A prefix_len tensor is (B,).
        backend: "auto" | "triton" | "reference", as in ``aimkern.attention``.
        name: the implementation name to register.

    Also registers transformers' SDPA mask builder under ``name``, so that a padding mask reaches the
    attention as a dense mask (and is rejected there) instead of being dropped. Returns the registered
    callable. Raises ImportError when transformers is not installed.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            "aimkern.integrations.transformers needs transformers: pip install 'aimkern[hf]' "
            "(or pip install transformers)"
        ) from e
    fn = AimkernAttention(is_causal=is_causal, block_size=block_size, prefix_len=prefix_len, backend=backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return fn
