"""Conversion between timm's Vision Transformers and aimkern's CausalViT, weights included.

``from_timm(vit)`` accepts timm's ``VisionTransformer`` without class or register tokens: AIMv2
(``aimv2_*``: RMSNorm, SwiGLU, patch norm, no biases) and plain ViTs built with ``class_token=False`` (e.g.
``global_pool="avg"``). The result satisfies ``cv.forward_features(x, is_causal=False) ==
vit.forward_features(x)``. Its prediction head is new (randomly initialized): timm's classifier is not part
of the trunk. ``to_timm(cv)`` builds the timm ``VisionTransformer`` (``class_token=False``,
``global_pool="avg"``, ``num_classes=0``) with the trunk's weights, the same equality holding the other way.

State-dict mapping. aimkern's modules use timm's parameter names, so the trunk maps one to one::

    timm VisionTransformer               aimkern CausalViT
    patch_embed.proj.{weight,bias}       patch_embed.proj.{weight,bias}    (Conv2d layout (E, C, P, P))
    patch_embed.norm.weight              patch_embed.norm.weight           (AIMv2's patch norm)
    pos_embed (1, N, E)                  pos_embed (1, N, E)               (sin-cos presets: a buffer)
    blocks.i.norm1 / norm2               blocks.i.norm1 / norm2
    blocks.i.attn.qkv / attn.proj        blocks.i.attn.qkv / attn.proj     (packed q, k, v rows, as timm)
    blocks.i.mlp.fc1 / fc2               blocks.i.mlp.fc1 / fc2            (GELU MLP)
    blocks.i.mlp.fc1_g / fc1_x / fc2     blocks.i.mlp.fc1_g / fc1_x / fc2  (SwiGLU)
    norm                                 norm
    fc_norm (applied after pooling)      fc_norm (kept aside; see below)
    head                                 - (aimkern's ``head`` is the pretraining head)

The config records which biases exist: ``qkv_bias``, ``bias`` (the other linears), and ``norm_bias`` and
``patch_bias`` for the norms and the patch projection, which can have one where the linears have none (timm's
LayerNorms always do; AIMv2's patch projection does), so ``CausalViT(cv.config)`` takes the converted weights.
A timm bias the config cannot express is added to the converted model as a parameter holding timm's values,
and ``to_timm`` writes zeros where timm has a bias aimkern lacks. When timm normalizes after pooling
(``fc_norm``, the default with ``global_pool="avg"``), its ``forward_features`` has no final norm: the
converted model's ``norm`` is ``nn.Identity`` and timm's ``fc_norm`` is kept as ``cv.fc_norm`` (unused by
``forward``; ``to_timm`` puts it back). Unsupported features (class/register tokens, layer scale, q/k norm,
pre-norm, gated attention, other MLPs or activations) raise a ValueError naming them, rather than giving a
model that computes something else.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn

from ..models import CausalViT, ViTConfig
from ..models.config import TRUNK_FIELDS, current_names, mlp_ratio_for

_HEAD_SIDE = ("head.", "fc_norm.", "attn_pool.")  # timm modules after forward_features


def _fail(msg: str):
    raise ValueError(f"from_timm: {msg}")


def _square(value, name: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        _fail(f"only square {name} is supported, got {tuple(value)}")
    return int(a)


def _norm_kind(module: nn.Module, where: str) -> tuple:
    """('layernorm' | 'rmsnorm', eps) of a timm or torch norm layer."""
    from timm.layers import LayerNorm, RmsNorm

    if isinstance(module, (LayerNorm, nn.LayerNorm)):
        return "layernorm", float(module.eps)
    if isinstance(module, (RmsNorm, nn.RMSNorm)):
        eps = module.eps
        return "rmsnorm", float(torch.finfo(torch.float32).eps if eps is None else eps)
    _fail(f"{where} is a {type(module).__name__}; only LayerNorm and RmsNorm are supported")


def _mlp_kind(mlp: nn.Module, where: str) -> tuple:
    """('gelu' | 'swiglu', hidden width) of a timm Mlp (exact GELU) or SwiGLU."""
    from timm.layers import Mlp, SwiGLU
    from timm.layers.activations import GELU as TimmGELU  # F.gelu, exact

    exact_gelu = type(mlp.act) is TimmGELU or (type(mlp.act) is nn.GELU and mlp.act.approximate == "none")
    if type(mlp) is Mlp and exact_gelu and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.norm, nn.Identity):
        return "gelu", mlp.fc1.out_features
    if type(mlp) is SwiGLU and isinstance(mlp.act, nn.SiLU) and isinstance(mlp.norm, nn.Identity):
        return "swiglu", mlp.fc1_g.out_features
    act = getattr(mlp, "act", None)
    _fail(f"{where} is a {type(mlp).__name__} with {type(act).__name__ if act is not None else 'no'} activation; "
          "only timm's Mlp with exact GELU and SwiGLU with SiLU (no hidden norm) are supported")


def config_from_timm(vit: nn.Module, **overrides) -> ViTConfig:
    """The ViTConfig of a timm VisionTransformer's trunk (``overrides`` set the non-trunk fields)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        _fail(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    overrides = current_names(overrides, "from_timm")
    clash = set(TRUNK_FIELDS) & set(overrides)
    if clash:
        _fail(f"overrides {sorted(clash)} are fixed by the timm model's trunk")
    if vit.cls_token is not None or getattr(vit, "reg_token", None) is not None or vit.num_prefix_tokens:
        _fail("class and register tokens are not supported: build the timm model with class_token=False")
    if not isinstance(vit.norm_pre, nn.Identity):
        _fail("pre_norm (a norm before the blocks) is not supported")
    pe = vit.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        _fail(f"patch_embed.proj must be an nn.Conv2d, got {type(getattr(pe, 'proj', None)).__name__}")
    patch = _square(pe.patch_size, "patch_size")
    if tuple(pe.proj.stride) != (patch, patch):
        _fail("the patch projection must have stride == patch_size")
    img = _square(pe.img_size, "img_size")

    blocks = list(vit.blocks)
    first = blocks[0]
    dim = first.norm1.weight.shape[0]
    norm, eps = _norm_kind(first.norm1, "blocks.0.norm1")
    mlp, hidden = _mlp_kind(first.mlp, "blocks.0.mlp")
    for i, blk in enumerate(blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            _fail(f"blocks.{i} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; only "
                  "timm's pre-norm Block with its Attention is supported")
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            _fail(f"blocks.{i}: layer scale (init_values) is not supported")
        a = blk.attn
        plain = all(isinstance(m, nn.Identity) for m in (a.q_norm, a.k_norm, a.norm))
        if not plain or getattr(a, "gate", None) is not None:
            _fail(f"blocks.{i}.attn: q/k norm, attention output norm and gating are not supported")
        if a.num_heads != first.attn.num_heads or a.head_dim * a.num_heads != dim:
            _fail(f"blocks.{i}.attn: every block needs the same heads, with head_dim * num_heads == embed_dim")
        for name in ("norm1", "norm2"):
            if _norm_kind(getattr(blk, name), f"blocks.{i}.{name}") != (norm, eps):
                _fail(f"blocks.{i}.{name}: every norm must be the same kind with the same eps")
        if _mlp_kind(blk.mlp, f"blocks.{i}.mlp") != (mlp, hidden):
            _fail(f"blocks.{i}.mlp: every block needs the same MLP")
    final = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
    if not isinstance(final, nn.Identity) and _norm_kind(final, "norm") != (norm, eps):
        _fail("the final norm must match the blocks' norms")
    patch_norm = not isinstance(pe.norm, nn.Identity)
    if patch_norm and _norm_kind(pe.norm, "patch_embed.norm") != (norm, eps):
        _fail("the patch norm must match the blocks' norms")

    return ViTConfig(
        img_size=img, patch_size=patch, in_chans=pe.proj.in_channels, dim=dim, depth=len(blocks),
        num_heads=first.attn.num_heads, mlp_ratio=mlp_ratio_for(dim, hidden), norm=norm, norm_eps=eps, mlp=mlp,
        qkv_bias=first.attn.qkv.bias is not None, bias=first.attn.proj.bias is not None,
        # timm's LayerNorms carry a bias whatever the linear layers do: the config says so, not `bias`
        norm_bias=None if norm == "rmsnorm" else first.norm1.bias is not None,
        patch_bias=pe.proj.bias is not None, patch_norm=patch_norm,
        pos_embed="learned", **overrides,
    )


def _add_missing_bias(model: nn.Module, name: str, like: torch.Tensor) -> None:
    """Give ``model``'s module owning ``name`` (``...bias``) a zero bias parameter where it has none."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr != "bias" or getattr(owner, "bias", None) is not None:
        raise KeyError(name)
    owner.bias = nn.Parameter(torch.zeros_like(like))


def _trunk_state(vit: nn.Module) -> dict:
    return {k: v for k, v in vit.state_dict().items() if not k.startswith(_HEAD_SIDE)}


def from_timm(vit: nn.Module, **overrides) -> CausalViT:
    """A CausalViT with ``vit``'s trunk and weights (see the module docstring); ``overrides`` set the
    non-trunk ViTConfig fields (``head``, ``head_depth``, ``head_width``, ``is_causal``, ``block_size``, ...)."""
    cfg = config_from_timm(vit, **overrides)
    ref = next(vit.parameters())
    model = CausalViT(cfg).to(device=ref.device, dtype=ref.dtype)
    if isinstance(vit.norm, nn.Identity):  # timm normalizes after pooling (fc_norm) or not at all
        model.norm = nn.Identity()
        if not isinstance(vit.fc_norm, nn.Identity):
            model.fc_norm = copy.deepcopy(vit.fc_norm)
    src = _trunk_state(vit)
    if vit.pos_embed is None:  # timm without position embedding: a zero learned one is the same
        src["pos_embed"] = torch.zeros_like(model.pos_embed)
    ours = model.state_dict()
    for name in sorted(src.keys() - ours.keys()):
        try:
            _add_missing_bias(model, name, src[name])
        except KeyError:
            _fail(f"timm parameter {name!r} has no counterpart in CausalViT (an unsupported feature)")
    ours = model.state_dict()
    extra = sorted(k for k in ours.keys() - src.keys() if not k.startswith(("head.", "fc_norm.")))
    if any(not k.endswith(".bias") for k in extra):
        _fail(f"CausalViT parameters {extra} have no counterpart in the timm model")
    merged = dict(ours)
    merged.update({k: torch.zeros_like(ours[k]) for k in extra})  # timm has no such bias: zero is the same
    merged.update(src)
    model.load_state_dict(merged)
    return model


def to_timm(model: CausalViT) -> nn.Module:
    """timm's ``VisionTransformer`` (class_token=False, global_pool='avg', num_classes=0) holding ``model``'s
    trunk: its ``forward_features(x)`` equals ``model.forward_features(x, is_causal=False)``."""
    from timm.layers import LayerNorm, Mlp, RmsNorm, SwiGLU
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, CausalViT):
        raise TypeError(f"to_timm: expected a CausalViT, got {type(model).__name__}")
    cfg = model.config
    norm_layer = partial(LayerNorm if cfg.norm == "layernorm" else RmsNorm, eps=cfg.norm_eps)
    has_fc_norm = hasattr(model, "fc_norm")
    vit = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0, global_pool="avg",
        embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, proj_bias=cfg.bias, class_token=False, pos_embed="learn",
        fc_norm=has_fc_norm, final_norm=has_fc_norm or not isinstance(model.norm, nn.Identity),
        norm_layer=norm_layer, embed_norm_layer=norm_layer if cfg.patch_norm else None,
        act_layer=nn.GELU if cfg.mlp == "gelu" else nn.SiLU, mlp_layer=Mlp if cfg.mlp == "gelu" else SwiGLU,
    )
    ref = model.pos_embed
    vit = vit.to(device=ref.device, dtype=ref.dtype)
    src = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    src["pos_embed"] = model.pos_embed.detach().reshape(1, cfg.num_patches, cfg.dim)  # a buffer when sin-cos
    theirs = vit.state_dict()
    missing = sorted(src.keys() - theirs.keys())
    if missing:
        raise ValueError(f"to_timm: CausalViT parameters {missing} have no place in timm's VisionTransformer")
    merged = {k: torch.zeros_like(v) if k.endswith(".bias") else v for k, v in theirs.items()}
    extra = sorted(k for k in theirs.keys() - src.keys() if not k.endswith(".bias"))
    if extra:
        raise ValueError(f"to_timm: timm parameters {extra} would be left uninitialized")
    merged.update(src)
    vit.load_state_dict(merged)
    return vit.train(model.training)
