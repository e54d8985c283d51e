"""Models: CausalViT and its config and presets."""
from .causal_vit import CausalViT
from .config import PRESETS, ViTConfig

__all__ = ["CausalViT", "PRESETS", "ViTConfig"]
