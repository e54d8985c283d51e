"""Prediction heads on top of the trunk: AIM's MLP-only pixel head and the token head."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .block import MlpBlock


class PredictionHead(nn.Module):
    """(B, N, dim) -> (B, N, out_dim): optional MLP-only residual blocks at width ``hidden_dim``, then a linear.

    With ``depth = 0`` it is a single linear layer. ``features`` stops before the final linear, so a token
    head can feed ``out.weight`` to the fused linear + cross-entropy instead of building the logits.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int = 0,
        hidden_dim: int = 0,
        make_block_mlp: Callable[[int], nn.Module] = None,
        make_norm: Callable[[int], nn.Module] = None,
        bias: bool = True,
    ):
        super().__init__()
        width = hidden_dim if depth > 0 and hidden_dim > 0 else dim
        self.proj_in = nn.Linear(dim, width, bias=bias) if width != dim else nn.Identity()
        self.blocks = nn.ModuleList(MlpBlock(make_block_mlp(width), make_norm(width)) for _ in range(depth))
        self.norm = make_norm(width) if depth > 0 else nn.Identity()
        self.out = nn.Linear(width, out_dim, bias=bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))
