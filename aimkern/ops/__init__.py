"""Public ops: one file each (input checks, backend dispatch, autograd and custom-op registration), and the
launch layer they share (``LaunchPolicy`` / ``launch_policy``: autotuning and the attention backward path)."""
from ._launch import LaunchPolicy, current_policy, launch_policy
from .attention import AttentionParams, attention, attention_qkvpacked
from .cross_entropy import CrossEntropyParams, linear_cross_entropy
from .patch_embed import patch_embed
from .pixel_loss import PixelLossParams, next_patch_pixel_loss

__all__ = [
    "AttentionParams",
    "CrossEntropyParams",
    "LaunchPolicy",
    "PixelLossParams",
    "attention",
    "attention_qkvpacked",
    "current_policy",
    "launch_policy",
    "linear_cross_entropy",
    "next_patch_pixel_loss",
    "patch_embed",
]
