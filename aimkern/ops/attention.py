"""`aimkern.attention`: block-causal raster-order attention with AIM's prefix, SDPA's (B, H, N, D) layout.

Backend dispatch and input checks live here; the Triton launcher, autograd and custom-op registration
join this file when the kernel lands (kernels/attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..reference.attention import attention_reference
from ._checks import (
    check_float_dtype,
    check_same_device,
    check_tensor,
    normalize_prefix_len,
    resolve_backend,
)

OP = "attention"


@dataclass(frozen=True)
class AttentionParams:
    """Non-tensor options of one attention call."""

    is_causal: bool = False  # False: full bidirectional; True: (block-)causal in raster order
    block_size: int = 1  # causal granularity in tokens: 1 = token causal, grid width = row by row
    scale: Optional[float] = None  # softmax scale; None means D ** -0.5

    def resolved_scale(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else float(self.scale)


def _check_inputs(q, k, v, params: AttentionParams, backend: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, OP, ndim=4)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{OP}: q, k and v must have the same shape (B, H, N, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_same_device((("q", q), ("k", k), ("v", v)), OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float_dtype(q, "q", OP, backend)
    n, d = q.shape[2], q.shape[3]
    if n < 1:
        raise ValueError(f"{OP}: sequence length N must be >= 1, got {n}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"{OP}: head dim D must be a multiple of 8 in [16, 256], got {d}")
    if not isinstance(params.is_causal, bool):
        raise TypeError(f"{OP}: is_causal must be a bool, got {type(params.is_causal).__name__}")
    if isinstance(params.block_size, bool) or not isinstance(params.block_size, int) or params.block_size < 1:
        raise ValueError(f"{OP}: block_size must be an int >= 1, got {params.block_size!r}")
    if params.scale is not None and not isinstance(params.scale, (int, float)):
        raise TypeError(f"{OP}: scale must be None or a float, got {type(params.scale).__name__}")


def _attention_triton(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams) -> torch.Tensor:
    raise NotImplementedError(
        "aimkern.attention: the Triton kernel has not landed yet; use backend='reference' (or 'auto' on CPU)"
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with AIM's masks; a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        q, k, v: (B, H, N, D), fp16 / bf16 / fp32 (float64 on the reference backend), any strides.
            N >= 1; D a multiple of 8 in [16, 256].
        is_causal: False for full attention; True for raster-order (block-)causal attention.
        block_size: with is_causal, query i sees key j when j // block_size <= i // block_size.
        prefix_len: None, an int, or an int tensor (B,) with values in [0, N]: the first prefix_len[b]
            tokens of sample b are visible to every query (AIM's prefix-causal attention).
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (Triton on CUDA, reference on CPU), "triton" or "reference".

    Returns:
        (B, H, N, D) in the input dtype.

    Visibility for N = 6, is_causal=True, block_size=2, prefix_len=3 (x = visible)::

        keys ->   0 1 2 3 4 5
        query 0   x x x . . .
        query 1   x x x . . .
        query 2   x x x x . .
        query 3   x x x x . .
        query 4   x x x x x x
        query 5   x x x x x x
    """
    params = AttentionParams(is_causal=is_causal, block_size=block_size, scale=scale)
    check_tensor(q, "q", OP)
    be = resolve_backend(backend, q, OP)
    _check_inputs(q, k, v, params, be)
    prefix = normalize_prefix_len(prefix_len, q.shape[0], q.shape[2], q.device, OP)
    if be == "reference":
        return attention_reference(
            q, k, v, is_causal=is_causal, block_size=block_size, prefix_len=prefix, scale=params.scale
        )
    return _attention_triton(q, k, v, prefix, params)
