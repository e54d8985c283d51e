"""Models: CausalViT and its config and presets (CausalViT, which needs torch, is imported on first use).

``aimkern.hooks`` says where CausalViT's format methods (from_checkpoint, save_checkpoint, from_timm, to_timm) live:
in aimkern.checkpoints and aimkern.integrations.timm_convert, which import the model, never the reverse.
"""
from .config import PRESETS, ViTConfig

__all__ = ["CausalViT", "PRESETS", "ViTConfig"]


def __getattr__(name: str):
    if name == "CausalViT":
        from .causal_vit import CausalViT

        return CausalViT
    raise AttributeError(f"module 'aimkern.models' has no attribute {name!r}")
