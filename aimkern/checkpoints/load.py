"""``CausalViT.from_checkpoint`` and ``CausalViT.save_checkpoint``: released AIM / ViT weights in and out.

``from_checkpoint(src)`` reads a file (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``) or a state dict,
detects its layout (``aimkern.checkpoints.layouts``), maps the names, infers the config from the shapes
(or takes ``preset``), loads every trunk tensor and prints one line saying what it found. With
``strict=True`` a source key that maps to nothing, a trunk parameter the source does not set, or a shape
that does not fit is a ValueError listing them all. The pretraining head is new (random init) unless the
source is aimkern's own checkpoint: no released AIM checkpoint includes one.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Dict, Optional, Union

import torch

from ..models.config import TRUNK_FIELDS, ViTConfig, current_names
from .files import SAFETENSORS_SUFFIX, read_file, write_file
from .infer import describe, detect_layout, infer_config, matching_preset
from .layouts import SAVE_LAYOUTS, from_causal_vit, to_causal_vit

FORMAT = "aimkern"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, meta: dict):
    """(state dict, stored ViTConfig dict or None) of what a file holds."""
    if isinstance(meta, dict) and meta.get("format") == FORMAT and "config" in meta:
        return obj, json.loads(meta["config"])
    if isinstance(obj, dict) and "config" in obj and isinstance(obj.get("config"), dict):
        for key in ("state_dict", "model"):  # save_checkpoint(layout="aimkern"), an aimkern.train checkpoint
            if _is_state_dict(obj.get(key)):
                return obj[key], obj["config"]
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model", "module"):  # the common wrappers of other trainers
            if _is_state_dict(obj.get(key)):
                return obj[key], None
    if not _is_state_dict(obj):
        raise ValueError(f"src must hold a state dict of named tensors, got a {type(obj).__name__}"
                         + (f" with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else ""))
    return obj, None


def _config(preset, stored: Optional[dict], mapped: dict, layout: str, overrides: dict) -> ViTConfig:
    overrides = current_names(overrides, "overrides")
    if preset is not None:
        if isinstance(preset, str):
            cfg = ViTConfig.from_preset(preset, **overrides)
        elif isinstance(preset, ViTConfig):
            cfg = replace(preset, **overrides)
        else:
            raise TypeError(f"preset must be None, a preset name or a ViTConfig, got {type(preset).__name__}")
        if stored is not None:
            theirs, ours = ViTConfig.from_dict(stored).trunk(), cfg.trunk()
            diff = [f"{f}={theirs[f]!r} (preset: {ours[f]!r})" for f in TRUNK_FIELDS if theirs[f] != ours[f]]
            if diff:
                raise ValueError(f"preset: the checkpoint's own config differs: {', '.join(diff)}")
        return cfg
    if stored is not None:
        clash = sorted(set(overrides) & set(TRUNK_FIELDS))
        if clash:
            raise ValueError(f"overrides {clash} are fixed by the checkpoint's stored config")
        return ViTConfig.from_dict({**current_names(stored, "the stored config"), **overrides})
    return infer_config(mapped, layout, overrides)


def _read(src) -> tuple:
    """(state dict, stored config dict or None, display name) of a path or state dict."""
    if isinstance(src, dict):
        obj, meta, name = src, {}, "state dict"
    else:
        obj, meta = read_file(src)
        name = os.fspath(src)
    state, stored = _unwrap(obj, meta)
    return state, stored, name


def _load_mapped(model, mapped: dict, unmapped: list, layout: str, name: str, strict: bool) -> tuple:
    """Load CausalViT-named ``mapped`` into ``model`` (trunk; head too when an aimkern checkpoint has one that
    fits); returns (head loaded, problems). Strict: any problem is a ValueError listing them all."""
    ours = model.state_dict()
    with_head = layout == "aimkern" and any(k.startswith("head.") for k in mapped)
    if with_head and any(k.startswith("head.") and (k not in mapped or mapped[k].shape != ours[k].shape)
                         for k in ours):
        with_head = False  # a checkpoint of another head (pixel vs token, other width): the trunk only
    expected = {k for k in ours if with_head or not k.startswith("head.")}
    unexpected = sorted(unmapped + [k for k in mapped if k not in expected and not (k.startswith("head.")
                                                                                   and layout == "aimkern")])
    missing = sorted(expected - mapped.keys())
    wrong = sorted(f"{k}: {tuple(mapped[k].shape)} vs {tuple(ours[k].shape)}" for k in expected & mapped.keys()
                   if mapped[k].shape != ours[k].shape)
    problems = [f"{what}: {items}" for what, items in (
        ("source keys that map to no CausalViT parameter", unexpected),
        ("CausalViT parameters left unset", missing),
        ("shapes that do not fit (source vs model)", wrong)) if items]
    if problems and strict:
        raise ValueError(f"from_checkpoint: {name} ({layout} layout) does not fit a CausalViT of config "
                         f"[{describe(model.config)}]: " + "; ".join(problems)
                         + "; pass preset= / overrides for another config, or strict=False to load what fits")
    load = {k: v for k, v in mapped.items() if k in expected and v.shape == ours[k].shape}
    model.load_state_dict(load, strict=False)
    return with_head, problems


def from_checkpoint(src: Union[str, os.PathLike, Dict[str, torch.Tensor]], *, preset=None, strict: bool = True,
                    verbose: bool = True, **overrides):
    """A CausalViT holding ``src``'s weights (see the module docstring).

    Args:
        src: a checkpoint path or a state dict, in any layout of ``aimkern.checkpoints.LAYOUTS``.
        preset: a preset name or ViTConfig to build instead of the inferred config (its trunk must fit).
        strict: raise on any unmapped key, unset trunk parameter or shape mismatch (else report and skip).
        verbose: print the one-line report.
        overrides: ViTConfig fields, e.g. ``num_heads`` (shapes cannot tell it), ``img_size`` (sin-cos models),
            or the free fields (``head``, ``is_causal``, ``block_size``, ``backend``, ...).

    Returns a CausalViT in train mode; ``forward_features(x, is_causal=False)`` computes the source model's
    features: ml-aim's trunk output after ``post_trunk_norm``, timm's ``forward_features``, transformers'
    ``last_hidden_state``. ``model.checkpoint_source`` records ``{"src", "layout"}``.
    """
    from ..models.causal_vit import CausalViT

    state, stored, name = _read(src)
    layout = "aimkern" if stored is not None else detect_layout(state)
    mapped, unmapped = to_causal_vit(state, layout)
    cfg = _config(preset, stored, mapped, layout, overrides)
    model = CausalViT(cfg)
    with_head, problems = _load_mapped(model, mapped, unmapped, layout, name, strict)
    if verbose:
        match = matching_preset(cfg)
        print(f"CausalViT.from_checkpoint: {name}: {layout} layout, {describe(cfg)}"
              + (f" (preset {match})" if match else "") + f"; head: {'loaded' if with_head else 'new'}"
              + (f"; skipped {len(problems)} problem(s): {'; '.join(problems)}" if problems else ""), flush=True)
    model.checkpoint_source = {"src": name, "layout": layout}
    return model


def load_trunk_into(model, src, *, strict: bool = True) -> str:
    """Load ``src``'s trunk (any layout) into an existing CausalViT, leaving its head as it is; returns the
    layout. No second model is built (``aimkern.train --init`` uses this on the run's own model)."""
    state, stored, name = _read(src)
    layout = "aimkern" if stored is not None else detect_layout(state)
    mapped, unmapped = to_causal_vit(state, layout)
    mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
    _load_mapped(model, mapped, unmapped, layout, name, strict)
    return layout


def inspect_checkpoint(src, **overrides) -> tuple:
    """(layout, ViTConfig) of ``src`` without building a model (tensors are memory-mapped, not read)."""
    state, stored, _name = _read(src)
    layout = "aimkern" if stored is not None else detect_layout(state)
    mapped, _ = to_causal_vit(state, layout)
    return layout, _config(None, stored, mapped, layout, overrides)


def _zero_bias(state: dict, owner: str, dim: int, like: torch.Tensor) -> None:
    state.setdefault(f"{owner}.bias", torch.zeros(dim, dtype=like.dtype))


def _check_fits(cfg: ViTConfig, layout: str) -> None:
    """Raise when a layout cannot express ``cfg``'s trunk."""
    need = {
        "hf": dict(norm="rmsnorm", mlp="swiglu", patch_norm=True, patch_bias=True),
        "ml-aim": dict(patch_norm=True, patch_bias=True, qkv_bias=False, bias=False),
    }.get(layout, {})
    bad = [f"{f}={getattr(cfg, f if f != 'patch_bias' else 'has_patch_bias')!r} (needs {v!r})"
           for f, v in need.items() if getattr(cfg, f if f != "patch_bias" else "has_patch_bias") != v]
    if layout == "hf" and cfg.qkv_bias != cfg.bias:
        bad.append(f"qkv_bias={cfg.qkv_bias} with bias={cfg.bias} (transformers ties out_proj's bias to qkv_bias)")
    if layout == "ml-aim":
        v1 = (cfg.norm, cfg.mlp, cfg.pos_embed, cfg.norm_eps, cfg.has_norm_bias) == ("layernorm", "gelu", "sincos",
                                                                                    1e-6, True)
        v2 = (cfg.norm, cfg.mlp, cfg.norm_eps) == ("rmsnorm", "swiglu", 1e-5)
        if not (v1 or v2):
            bad.append("neither AIMv1 (LayerNorm with bias, eps 1e-6, GELU, sin-cos) nor AIMv2 (RMSNorm eps 1e-5, "
                       f"SwiGLU): norm={cfg.norm!r} eps={cfg.norm_eps:g} mlp={cfg.mlp!r} pos_embed={cfg.pos_embed!r}")
    if bad:
        raise ValueError(f"save_checkpoint: layout={layout!r} cannot hold this model: {', '.join(bad)}")


def save_checkpoint(model, path: Union[str, os.PathLike], layout: str = "aimkern") -> str:
    """Write ``model`` (a CausalViT) to ``path`` in ``layout``; returns the file written.

    - ``"aimkern"``: every tensor (head included) and the ViTConfig; ``from_checkpoint`` rebuilds it exactly.
    - ``"timm"``: the trunk under timm's names (a sin-cos ``pos_embed`` written out, zeros for the biases
      timm's modules have and this model lacks): loads into timm's VisionTransformer / ``aimv2_*`` of the same
      trunk (``model.to_timm()`` builds one).
    - ``"hf"``: transformers ``Aimv2VisionModel`` names (AIMv2 trunks only). A directory ``path`` gets
      ``model.safetensors`` and ``config.json``, so ``Aimv2VisionModel.from_pretrained(path)`` loads it.
    - ``"ml-aim"``: Apple's ml-aim names, v1 or v2 by the trunk (what ``load_state_dict`` of ml-aim's model
      takes, the probe head aside).
    The suffix picks the format: ``.safetensors``, else torch (``.pth`` / ``.pt`` / ``.bin``).
    """
    from ..models.causal_vit import CausalViT

    if not isinstance(model, CausalViT):
        raise TypeError(f"save_checkpoint: model must be a CausalViT, got {type(model).__name__}")
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"save_checkpoint: layout must be one of {SAVE_LAYOUTS}, got {layout!r}")
    cfg = model.config
    path = os.fspath(path)
    if layout == "aimkern":
        write_file(model.state_dict(), path, {"format": FORMAT, "config": cfg.to_dict()})
        return path
    _check_fits(cfg, layout)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    extra = sorted(k for k in trunk if not k.startswith(("patch_embed.", "blocks.", "pos_embed", "norm.")))
    if extra:
        raise ValueError(f"save_checkpoint: {extra} are not part of a {layout} trunk")
    if layout == "timm":
        if cfg.pos_embed == "sincos":
            trunk["pos_embed"] = model.pos_embed.detach().reshape(1, cfg.num_patches, cfg.dim)
        like = trunk["patch_embed.proj.weight"]
        if not cfg.has_patch_bias:
            _zero_bias(trunk, "patch_embed.proj", cfg.dim, like)
        if cfg.norm == "layernorm" and not cfg.has_norm_bias:
            for key in [k for k in trunk if k.endswith(".weight") and ("norm" in k.split(".")[-2])]:
                _zero_bias(trunk, key[: -len(".weight")], cfg.dim, like)
    out = from_causal_vit(trunk, layout, swiglu=cfg.mlp == "swiglu")
    if layout == "hf" and not os.path.splitext(path)[1]:
        os.makedirs(path, exist_ok=True)
        _hf_config(cfg).to_json_file(os.path.join(path, "config.json"))
        path = os.path.join(path, "model" + SAFETENSORS_SUFFIX)
    write_file(out, path)
    return path


def _hf_config(cfg: ViTConfig):
    from transformers import Aimv2VisionConfig

    return Aimv2VisionConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.mlp_hidden_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, num_channels=cfg.in_chans, image_size=cfg.img_size,
        patch_size=cfg.patch_size, rms_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias, mlp_bias=cfg.bias,
        use_head=False, is_native=cfg.pos_embed == "sincos",
    )
