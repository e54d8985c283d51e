"""Checkpoints in and out of CausalViT: Apple's ml-aim (AIMv1, AIMv2), timm, transformers and aimkern's own.

``CausalViT.from_checkpoint(src, preset=None, strict=True)`` and ``model.save_checkpoint(path, layout=...)``
are the entry points; ``aimkern.checkpoints.layouts`` documents every layout's names.
"""
from .files import read_file, sha256_file, write_file
from .infer import detect_layout, infer_config
from .layouts import LAYOUTS, SAVE_LAYOUTS
from .load import from_checkpoint, inspect_checkpoint, load_trunk_into, save_checkpoint

__all__ = ["LAYOUTS", "SAVE_LAYOUTS", "detect_layout", "from_checkpoint", "infer_config", "inspect_checkpoint",
           "load_trunk_into", "read_file", "save_checkpoint", "sha256_file", "write_file"]
