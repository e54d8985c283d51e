"""Which layout a state dict is in, and the ViTConfig its shapes imply.

Shapes give the patch size, channels, width, depth, MLP kind and width, which biases and norms exist and,
for learned positions, the image size. They cannot give the number of heads or the norm epsilon: those
come from the released models of the trunk's family, or from ``preset`` / ``num_heads=``. A width no
released model has is refused (a ValueError naming ``num_heads=`` and ``preset=``) unless the family fixes
the head width: a guessed head count loads without complaint and computes other features.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional

import torch

from ..models.config import PRESETS, ViTConfig, current_names, mlp_ratio_for

# Released widths -> heads. AIMv1: ml-aim aim_600M ... aim_7B; AIMv2: aimv2_base ... aimv2_3B; ViT
# (GELU MLP, LayerNorm: timm's vit_tiny ... vit_huge; ViT-H/14's heads are 80 wide, not 64).
AIM_V1_HEADS = {1536: 12, 2048: 16, 3072: 24, 4096: 32}
AIM_V2_HEADS = {768: 6, 1024: 8, 1536: 12, 2048: 16, 3072: 24}
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Families whose every model has heads of one width (AIMv1 and AIMv2: 128), so that any width that is a
# multiple of it tells the heads. Classic ViTs do not (64 up to ViT-L, 80 for ViT-H): released widths only.
FAMILY_HEAD_WIDTH = {"AIMv1": 128, "AIMv2": 128}
LIT_PREFIX = "image_encoder."  # ml-aim's AIMv2 LiT model holds its vision encoder under this name
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def detect_layout(state: Dict[str, torch.Tensor]) -> str:
    """'ml-aim-v1' | 'ml-aim-v2' | 'hf' | 'timm' | 'aimkern' (a CausalViT state dict: timm's names and aimkern's
    ``head.out``) of a state dict's keys; a ValueError naming a few keys when none fits."""
    keys = {k[len(LIT_PREFIX):] if k.startswith(LIT_PREFIX) else k for k in state}
    if "preprocessor.patchifier.proj.weight" in keys:
        return "ml-aim-v2" if any(k.endswith(".mlp.fc3.weight") for k in keys) else "ml-aim-v1"
    if {"embeddings.patch_embed.weight", "vision_model.embeddings.patch_embed.weight"} & keys:
        return "hf"
    if "patch_embed.proj.weight" in keys:
        return "aimkern" if "head.out.weight" in keys else "timm"  # a CausalViT state dict has its head.out
    sample = sorted(keys)[:6]
    raise ValueError(f"src: unrecognized checkpoint layout (keys {sample}...); expected ml-aim v1/v2 "
                     "(preprocessor.patchifier.*), timm / aimkern (patch_embed.proj.*) or transformers "
                     "Aimv2VisionModel (embeddings.patch_embed.*)")


def _family(layout: str, aimv2_like: bool, gelu_layernorm: bool) -> tuple:
    """(family name, its released widths -> heads) of a trunk: AIMv1 (ml-aim's v1 layout), AIMv2 (RMSNorm
    and SwiGLU, any layout), ViT (GELU and LayerNorm in the timm / aimkern layouts), else none."""
    if layout == "ml-aim-v1":
        return "AIMv1", AIM_V1_HEADS
    if aimv2_like:
        return "AIMv2", AIM_V2_HEADS
    if gelu_layernorm and layout in ("timm", "aimkern"):
        return "ViT", VIT_HEADS
    return None, {}


def _heads(layout: str, dim: int, family: Optional[str], released: dict) -> int:
    if dim in released:
        return released[dim]
    width = FAMILY_HEAD_WIDTH.get(family)
    if width is not None and dim % width == 0:
        return dim // width
    what = f"no released {family} model is {dim} wide" if family else "its MLP and norms match no released family"
    fixed = f" and {family}'s {width}-wide heads do not divide it" if width else ""
    raise ValueError(f"src: cannot tell the number of heads of a {dim}-wide {layout} trunk ({what}{fixed}; the "
                     "shapes do not hold it): pass num_heads= (the source model's head count) or preset=")


def infer_config(state: Dict[str, torch.Tensor], layout: str, overrides: Optional[dict] = None) -> ViTConfig:
    """The ViTConfig of a CausalViT-named trunk ``state`` from a ``layout`` checkpoint. ``overrides`` (any
    ViTConfig fields) win over what is inferred: e.g. num_heads, or img_size for sin-cos positions."""
    overrides = current_names(overrides or {}, "overrides")

    def need(key):
        if key not in state:
            raise ValueError(f"src: the {layout} checkpoint has no {key!r} (a {layout} trunk needs it)")
        return state[key]

    proj = need("patch_embed.proj.weight")
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"src: the patch projection must be a square Conv2d kernel (E, C, P, P), "
                         f"got {tuple(proj.shape)}")
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = sorted({int(m.group(1)) for k in state for m in [_BLOCK.match(k)] if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"src: blocks must be numbered 0..depth-1, found {blocks[:8]}")
    swiglu = "blocks.0.mlp.fc1_g.weight" in state
    hidden = need("blocks.0.mlp.fc1_g.weight" if swiglu else "blocks.0.mlp.fc1.weight").shape[0]
    has_norm_bias = "blocks.0.norm1.bias" in state
    # RMSNorm in ml-aim v2 and transformers; in timm's layout a bias-free norm is timm's RmsNorm (its
    # LayerNorms always have a bias).
    rms = layout in ("ml-aim-v2", "hf") or (layout == "timm" and not has_norm_bias) or (
        layout == "aimkern" and swiglu and not has_norm_bias)  # aimkern: a bias-free LayerNorm is possible
    aimv2_like = rms and swiglu
    classic = not (rms or swiglu)  # a ViT's GELU MLP and LayerNorm
    norm_eps = 1e-5 if rms else 1e-6
    proj_bias = "blocks.0.attn.proj.bias" in state
    mlp_bias = f"blocks.0.mlp.{'fc1_g' if swiglu else 'fc1'}.bias" in state
    if proj_bias != mlp_bias:
        raise ValueError("src: the attention output projection and the MLP must both have biases or neither "
                         f"(proj bias: {proj_bias}, MLP bias: {mlp_bias}); CausalViT has one switch for both")
    if "pos_embed" in state:
        n = state["pos_embed"].shape[-2]
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"src: pos_embed has {n} positions, not a square grid (a class token?)")
        img_size, pos = grid * patch, "learned"
    else:
        img_size, pos = 224, "sincos"  # AIM's resolution; the native model takes img_size=...
    fields = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, dim=dim, depth=len(blocks),
        num_heads=overrides.get("num_heads") or _heads(layout, dim, *_family(layout, aimv2_like, classic)),
        mlp_ratio=mlp_ratio_for(dim, hidden), norm="rmsnorm" if rms else "layernorm", norm_eps=norm_eps,
        mlp="swiglu" if swiglu else "gelu", qkv_bias="blocks.0.attn.qkv.bias" in state, bias=proj_bias,
        norm_bias=None if rms else has_norm_bias, patch_bias="patch_embed.proj.bias" in state,
        patch_norm="patch_embed.norm.weight" in state, pos_embed=pos,
    )
    if layout == "ml-aim-v1":  # AIMv1's pretraining head (never released: a fresh one)
        fields.update(head_depth=12, head_width=2048)
    if layout == "aimkern":
        fields.update(_head_fields(state, patch * patch * in_chans))
    fields.update(overrides)
    return ViTConfig(**fields)


def _head_fields(state: Dict[str, torch.Tensor], pixels: int) -> dict:
    """The pretraining head of a CausalViT state dict: depth and width of its MLP blocks, pixel or token."""
    depth = len({int(m.group(1)) for k in state for m in [re.match(r"head\.blocks\.(\d+)\.", k)] if m})
    out_dim, width = state["head.out.weight"].shape
    fields = dict(head_depth=depth, head_width=width if depth else 0)
    return dict(fields, head="pixel") if out_dim == pixels else dict(fields, head="token", vocab_size=out_dim)


def matching_preset(config: ViTConfig) -> Optional[str]:
    """The preset whose trunk fields equal ``config``'s, if any (for the one-line report)."""
    trunk = config.trunk()
    for name, preset in PRESETS.items():
        if preset.trunk() == trunk:
            return name
    return None


def describe(config: ViTConfig) -> str:
    """A compact one-line summary of a config's trunk."""
    c = config
    bias = "+".join(n for n, on in (("qkv", c.qkv_bias), ("linear", c.bias), ("norm", c.has_norm_bias),
                                     ("patch", c.has_patch_bias)) if on) or "none"
    return (f"dim={c.dim} depth={c.depth} heads={c.num_heads} patch={c.patch_size} img={c.img_size} "
            f"mlp={c.mlp}:{c.mlp_hidden_dim} norm={c.norm}(eps={c.norm_eps:g}) bias={bias} "
            f"patch_norm={c.patch_norm} pos={c.pos_embed}")
