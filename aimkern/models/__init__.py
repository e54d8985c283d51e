"""Models: CausalViT and its config and presets (CausalViT, which needs torch, is imported on first use)."""
from .config import PRESETS, ViTConfig

__all__ = ["CausalViT", "PRESETS", "ViTConfig"]


def __getattr__(name: str):
    if name == "CausalViT":
        from .causal_vit import CausalViT

        return CausalViT
    raise AttributeError(f"module 'aimkern.models' has no attribute {name!r}")
