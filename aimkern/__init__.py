"""aimkern: Triton kernels and a lean causal ViT for fast autoregressive (AIM-style) ViT pretraining.

Public API (docs/design.md explains the choices behind it): the fused ops ``attention``, ``patch_embed``,
``linear_cross_entropy`` and ``next_patch_pixel_loss`` (each with ``backend="auto" | "triton" | "reference"``),
with ``attention_qkvpacked`` for a ViT block's packed qkv (all in ``aimkern.functional``), the model
``CausalViT`` with its ``ViTConfig`` and presets (``CausalViT.from_checkpoint`` reads Apple's
ml-aim, timm and transformers checkpoints), the modules in ``aimkern.nn``, and ``patch`` (``patch_timm``), which
puts timm, ml-aim and ml-l3m models on aimkern's attention.

The names are imported on first use (PEP 562), so ``import aimkern.train`` and ``python -m aimkern.train
--help`` do not pay for torch, Triton and timm.
"""
from __future__ import annotations

import importlib

from . import hooks as _hooks  # torch-free: a table of names

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "CausalViT": (".models", "CausalViT"),
    "PRESETS": (".models.config", "PRESETS"),
    "ViTConfig": (".models.config", "ViTConfig"),
    "attention": (".functional", "attention"),
    "attention_qkvpacked": (".functional", "attention_qkvpacked"),
    "attention_varlen": (".functional", "attention_varlen"),
    "attention_varlen_qkvpacked": (".functional", "attention_varlen_qkvpacked"),
    "linear_cross_entropy": (".functional", "linear_cross_entropy"),
    "next_patch_pixel_loss": (".functional", "next_patch_pixel_loss"),
    "next_patch_pixel_loss_varlen": (".functional", "next_patch_pixel_loss_varlen"),
    "patch_embed": (".functional", "patch_embed"),
    "PackedImages": (".data.packing", "PackedImages"),
    "pack_images": (".data.packing", "pack_images"),
    "functional": (".functional", None),
    "nn": (".nn", None),
    "ops": (".ops", None),
    "models": (".models", None),
    "integrations": (".integrations", None),
    "reference": (".reference", None),
    "tokenizers": (".tokenizers", None),
    "patch_timm": (".integrations.timm", "patch_timm"),
    "patch": (".patching", "patch"),  # a module named patch would shadow the function
}

# CausalViT's format methods live in the layers that build on the model and import it (aimkern.checkpoints,
# the timm conversion): the model never imports them. This root, above both and run before either, tells the
# model where each is (aimkern.hooks); a provider is imported on the method's first call.
_MODEL_METHODS = {
    "from_checkpoint": ".checkpoints.load", "save_checkpoint": ".checkpoints.load",
    "from_timm": ".integrations.timm_convert", "to_timm": ".integrations.timm_convert",
}
for _method, _module in _MODEL_METHODS.items():
    _hooks.provide("CausalViT." + _method, __name__ + _module, _method)

# The public ops moved from aimkern.ops (now the Triton paths only) up to aimkern.functional; aimkern.ops keeps
# deprecated aliases for one release (its __getattr__), found here like the model's methods. aimkern.ops.attention
# and aimkern.ops.patch_embed are the ops' modules now (a function of the module's own name shadowed it).
OPS_MOVED = ("attention_qkvpacked", "linear_cross_entropy", "next_patch_pixel_loss")
for _op in OPS_MOVED:
    _hooks.provide("aimkern.ops.deprecated." + _op, __name__ + ".functional", _op)
# Issue 29 names the packed varlen op aimkern.ops.attention_varlen_qkvpacked: the same function, no warning.
_hooks.provide("aimkern.ops.attention_varlen_qkvpacked", __name__ + ".functional", "attention_varlen_qkvpacked")

__all__ = sorted(k for k in _LAZY if k not in ("tokenizers", "ops", "models", "integrations", "functional"))


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'aimkern' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
