"""The trunk to evaluate, from the command line's MODEL, and its random-init twin (the baseline).

MODEL is one of:
- a training run's directory (holding ``checkpoint.pt``) or a checkpoint file written by ``aimkern.train``:
  the config is read from the checkpoint; the baseline is the very initialization the run started from
  (its ``--seed``);
- a preset name (``vit-tiny``, ``vit-b16``, ...): a random-init model (``--seed``), itself a baseline;
- ``timm:NAME``: a timm model converted by ``CausalViT.from_timm`` (weights from timm's pretrained hub, or
  from ``--weights FILE``; ``--timm-kwargs`` passes model options); the baseline is a random init of the
  converted config.
A plain state-dict file (no ``config`` inside) needs ``--preset``; a file in another layout (Apple's ml-aim,
transformers, any ``.safetensors``) is read by ``CausalViT.from_checkpoint``, its config inferred (``--num-heads``
when its width is no released model's: the shapes do not hold the head count). A
``--preset`` that disagrees with the checkpoint's is an error, as are weights whose shapes do not fit.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..models import PRESETS, CausalViT, ViTConfig
from ..checkpoints import run_files as ckpt

# Config fields that decide the trunk's weights' shapes (a checkpoint of another preset differs in one).
_SHAPE_FIELDS = ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "mlp_ratio", "mlp", "norm")


@dataclass
class Trunk:
    """A model to probe: ``model`` (eval mode, on CPU), a display ``name``, and ``baseline()`` building the
    random-init twin (None when the model is itself a random init)."""
    model: CausalViT
    name: str
    baseline: Optional[Callable[[], CausalViT]]


def seeded_init(config: ViTConfig, seed: int) -> CausalViT:
    """``CausalViT(config)`` initialized under ``torch.manual_seed(seed)``: the same weights
    ``aimkern.train`` starts a run of that seed from, without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalViT(config).eval()


def model_digest(model: CausalViT) -> str:
    """sha256 of the config and every trunk tensor's bytes: the model's identity in the feature cache. The
    pretraining head is left out: features never pass through it (and it is not loaded from checkpoints)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_preset(preset: Optional[str], config: ViTConfig, where: str, trained_preset: Optional[str]) -> None:
    if preset is None:
        return
    want = ViTConfig.from_preset(preset)
    diff = [f"{f}={getattr(config, f)} (preset: {getattr(want, f)})" for f in _SHAPE_FIELDS
            if f != "img_size" and getattr(config, f) != getattr(want, f)]
    if diff or (trained_preset is not None and trained_preset != preset):
        raise ValueError(f"{where} is a {trained_preset or 'different'} model, not --preset {preset}: "
                         f"{', '.join(diff) or 'its run used --preset ' + str(trained_preset)}; drop --preset "
                         "(the checkpoint's own config is used) or pass the matching checkpoint")


def _load_weights(model: CausalViT, state: dict, where: str) -> None:
    """Load the trunk's weights (the pretraining head may differ: pixel vs token, or absent)."""
    trunk = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = {k for k in model.state_dict() if not k.startswith("head.")}
    missing, unexpected = sorted(expected - trunk.keys()), sorted(trunk.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not fit a {model.config.dim}-wide, {model.config.depth}-block "
                         f"CausalViT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(model.state_dict()[k].shape)}" for k, v in trunk.items()
             if tuple(v.shape) != tuple(model.state_dict()[k].shape)]
    if wrong:
        raise ValueError(f"{where}: weight shapes do not fit the model (checkpoint vs model): {wrong[:5]}")
    model.load_state_dict(trunk, strict=False)


def _from_released(path: str, preset: Optional[str], backend: str, seed: Optional[int],
                   num_heads: Optional[int] = None) -> Trunk:
    """Another layout's weights (Apple's ml-aim, timm, transformers; issue 18) through from_checkpoint."""
    overrides = {"backend": backend} if preset else {"backend": backend, "head_depth": 0}  # the probes need no head
    if num_heads is not None:
        overrides["num_heads"] = num_heads
    model = CausalViT.from_checkpoint(path, preset=preset, **overrides)
    config = model.config
    return Trunk(model.eval(), os.path.basename(path), lambda: seeded_init(config, seed or 0))


def _from_checkpoint(path: str, preset: Optional[str], backend: str, seed: Optional[int],
                     num_heads: Optional[int] = None) -> Trunk:
    if path.endswith(".safetensors"):
        return _from_released(path, preset, backend, seed, num_heads)
    state = ckpt.load(path)
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) and \
            "blocks.0.attn.qkv.weight" not in state:  # not CausalViT's names: a released layout
        return _from_released(path, preset, backend, seed, num_heads)
    if num_heads is not None:
        raise ValueError("--num-heads applies to a checkpoint in another layout (ml-aim, timm, transformers): "
                         f"{path} holds CausalViT's names, whose config (or --preset) gives the heads")
    if isinstance(state, dict) and "model" in state and "config" in state:
        config = ViTConfig.from_dict({**state["config"], "backend": backend})
        run_args = state.get("args") or {}
        _check_preset(preset, config, path, run_args.get("preset"))
        weights, run_seed = state["model"], run_args.get("seed", 0)
    elif isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        if preset is None:
            raise ValueError(f"{path} is a plain state dict without a config: give --preset")
        config, weights, run_seed = ViTConfig.from_preset(preset, backend=backend), state, 0
    else:
        raise ValueError(f"{path} is neither an aimkern.train checkpoint nor a CausalViT state dict")
    model = CausalViT(config)
    _load_weights(model, weights, path)
    base_seed = run_seed if seed is None else seed
    return Trunk(model.eval(), os.path.basename(os.path.dirname(os.path.abspath(path))) or path,
                 lambda: seeded_init(config, base_seed))


def _from_timm(name: str, weights: Optional[str], timm_kwargs: dict, backend: str, seed: int) -> Trunk:
    import timm

    vit = timm.create_model(name, pretrained=weights is None, num_classes=0, **timm_kwargs)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--weights {weights} does not fit timm's {name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    model = CausalViT.from_timm(vit, backend=backend)
    config = model.config
    return Trunk(model.eval(), f"timm:{name}", lambda: seeded_init(config, seed))


def load_trunk(spec: str, *, preset: Optional[str] = None, seed: Optional[int] = None, backend: str = "auto",
               img_size: Optional[int] = None, weights: Optional[str] = None,
               timm_kwargs: Optional[dict] = None, num_heads: Optional[int] = None) -> Trunk:
    """The trunk MODEL names (see the module docstring). ``num_heads``: the heads of a checkpoint in another
    layout, when its width is no released model's."""
    if num_heads is not None and (spec.startswith("timm:") or spec in PRESETS):
        raise ValueError("--num-heads applies to a checkpoint in another layout, not to a preset or timm:NAME")
    if spec.startswith("timm:"):
        return _from_timm(spec[len("timm:"):], weights, timm_kwargs or {}, backend, seed or 0)
    if spec in PRESETS:
        if preset is not None and preset != spec:
            raise ValueError(f"MODEL is the preset {spec!r} but --preset says {preset!r}")
        overrides = {"backend": backend, **({"img_size": img_size} if img_size else {})}
        return Trunk(seeded_init(ViTConfig.from_preset(spec, **overrides), seed or 0), f"{spec} (random init)", None)
    path = ckpt.checkpoint_path(spec) if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        where = f"{spec} is a directory without {ckpt.CHECKPOINT_NAME}" if os.path.isdir(spec) else f"no file {spec}"
        raise FileNotFoundError(f"MODEL: {where}; expected a training run's directory, a checkpoint, a preset "
                                f"({', '.join(sorted(PRESETS))}) or timm:NAME")
    if img_size is not None:
        raise ValueError("--img-size applies to a preset at random init only: a checkpoint keeps its own size")
    return _from_checkpoint(path, preset, backend, seed, num_heads)
