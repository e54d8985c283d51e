"""Build the CausalViT of a run, and add activation checkpointing from the outside."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..models import CausalViT
from ..models.config import ViTConfig
from .config import model_overrides


def model_config(preset: str, *, img_size: Optional[int] = None, objective: str = "pixel",
                 vocab_size: Optional[int] = None, backend: str = "auto") -> ViTConfig:
    """The preset's config with the run's overrides (image size, token head and vocabulary, op backend):
    what ``build_model`` builds, read without building it (no parameters are allocated)."""
    overrides = model_overrides(img_size=img_size, objective=objective, vocab_size=vocab_size)
    return ViTConfig.from_preset(preset, backend=backend, **overrides)


def build_model(preset: str, *, img_size: Optional[int] = None, objective: str = "pixel",
                vocab_size: Optional[int] = None, backend: str = "auto") -> CausalViT:
    """The preset's CausalViT with the run's overrides (image size, token head and vocabulary, op backend)."""
    return CausalViT(model_config(preset, img_size=img_size, objective=objective, vocab_size=vocab_size,
                                  backend=backend))


def checkpointed_modules(model: CausalViT) -> list:
    """The modules whose activations are recomputed: every trunk block and every pixel-head block."""
    return list(model.blocks) + list(model.head.blocks)


def enable_activation_checkpointing(model: CausalViT) -> CausalViT:
    """Recompute each block in the backward instead of keeping its activations (non-reentrant
    ``torch.utils.checkpoint``). Each block's bound ``forward`` is wrapped on the instance, so parameter
    names, state dicts and the model class are unchanged. Returns ``model``."""
    for block in checkpointed_modules(model):
        if getattr(block, "_aimkern_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._aimkern_checkpointed = True
    return model

