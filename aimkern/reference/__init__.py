"""Plain-PyTorch references of every aimkern op: readable, and the definition of correct."""
from .attention import attention_mask, attention_reference
from .cross_entropy import linear_cross_entropy_reference
from .patch_embed import patch_embed_reference, patchify
from .pixel_loss import next_patch_pixel_loss_reference, pixel_targets
from .targets import counted_targets, target_mask

__all__ = [
    "attention_mask",
    "counted_targets",
    "attention_reference",
    "linear_cross_entropy_reference",
    "next_patch_pixel_loss_reference",
    "patch_embed_reference",
    "patchify",
    "pixel_targets",
    "target_mask",
]
