"""aimkern: Triton kernels and a lean causal ViT for fast autoregressive (AIM-style) ViT pretraining.

Public API (see DESIGN.md): the fused ops ``attention``, ``patch_embed``, ``linear_cross_entropy`` and
``next_patch_pixel_loss`` (each with ``backend="auto" | "triton" | "reference"``), the model
``CausalViT`` with its ``ViTConfig`` and presets, and the modules in ``aimkern.nn``.
"""
from . import nn, reference
from . import tokenizers
from .models import PRESETS, CausalViT, ViTConfig
from .ops import attention, linear_cross_entropy, next_patch_pixel_loss, patch_embed
from .integrations.timm import patch_timm

__version__ = "0.1.0"

__all__ = [
    "CausalViT",
    "PRESETS",
    "ViTConfig",
    "attention",
    "linear_cross_entropy",
    "next_patch_pixel_loss",
    "nn",
    "patch_embed",
    "patch_timm",
    "reference",
]
