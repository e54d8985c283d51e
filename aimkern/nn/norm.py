"""Normalization layers by name, so configs can say "layernorm" or "rmsnorm"."""
from __future__ import annotations

import torch.nn as nn

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, *, eps: float = 1e-6, bias: bool = True) -> nn.Module:
    """LayerNorm (with or without bias) or RMSNorm over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
