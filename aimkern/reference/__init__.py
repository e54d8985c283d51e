"""Plain-PyTorch references of every aimkern op: readable, and the definition of correct."""
from .attention import attention_mask, attention_reference
from .attention_varlen import attention_varlen_reference
from .cross_entropy import linear_cross_entropy_reference
from .patch_embed import patch_embed_reference, patchify
from .pixel_loss import counted_error_sum, next_patch_pixel_loss_reference, normalize_patches, pixel_targets
from .targets import counted_targets, target_mask
from .pixel_loss_varlen import next_patch_pixel_loss_varlen_reference

__all__ = [
    "attention_mask",
    "counted_targets",
    "attention_reference",
    "attention_varlen_reference",
    "counted_error_sum",
    "linear_cross_entropy_reference",
    "next_patch_pixel_loss_reference",
    "next_patch_pixel_loss_varlen_reference",
    "normalize_patches",
    "patch_embed_reference",
    "patchify",
    "pixel_targets",
    "target_mask",
]
