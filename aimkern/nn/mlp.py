"""Feed-forward layers: GELU MLP (ViT, AIMv1) and SwiGLU (AIMv2)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MLPS = ("gelu", "swiglu")


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's names)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """fc2(silu(fc1_g(x)) * fc1_x(x)) (timm's SwiGLU names); hidden_dim is the gated width."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc1_x = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


def make_mlp(kind: str, dim: int, hidden_dim: int, bias: bool = True) -> nn.Module:
    if kind == "gelu":
        return Mlp(dim, hidden_dim, bias)
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, bias)
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
