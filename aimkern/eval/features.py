"""Frozen features: full attention, the average of chosen blocks' outputs, extracted once per split.

AIM probes the average of its last blocks' outputs (ml-aim: the last 6 of 24, before the final norm); the
default here is the same quarter of the depth, at least one block and at most six. ``--layers`` picks others:
block indices (negative count from the end) such as ``-1`` or ``2,3``, ``last:K``, or ``final`` for
``forward_features``' output after the final norm.

Extraction hands batch b (of a fixed batching of the split) to rank b % W under torchrun, so every rank
runs the very batches a single process would, and writes its rows into the shared memory-mapped cache
(``cache.py``); without a cache one process keeps the arrays in memory.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..data.inputs import model_input
from ..models import CausalViT
from ..distributed import DistEnv, barrier
from . import cache as fcache
from .data import Split

FINAL = "final"
Layers = Union[Tuple[int, ...], str]


def default_layers(depth: int) -> Tuple[int, ...]:
    """AIM's choice scaled to the depth: the last max(1, min(6, depth // 4)) blocks."""
    k = max(1, min(6, depth // 4))
    return tuple(range(depth - k, depth))


def resolve_layers(spec: Optional[str], depth: int) -> Layers:
    """``--layers`` -> sorted block indices in [0, depth), or ``"final"``."""
    if spec is None or spec == "":
        return default_layers(depth)
    spec = spec.strip().lower()
    if spec == FINAL:
        return FINAL
    try:
        if spec.startswith("last:"):
            k = int(spec[len("last:"):])
            if not 1 <= k <= depth:
                raise ValueError
            return tuple(range(depth - k, depth))
        picked = sorted({int(s) % depth if -depth <= int(s) < depth else _bad() for s in spec.split(",")})
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected 'final', 'last:K' (1 <= K <= {depth}) or comma-separated "
                         f"block indices in [-{depth}, {depth})") from None
    return tuple(picked)


def _bad():
    raise ValueError


def describe_layers(layers: Layers) -> str:
    return FINAL if layers == FINAL else "avg(blocks " + ",".join(map(str, layers)) + ")"


@torch.no_grad()
def layer_features(model: CausalViT, images: torch.Tensor, layers: Layers) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, dim) float32: the mean of the chosen blocks' outputs (or the final
    normed features), under full attention. Block outputs are caught by forward hooks, so the model's own
    ``forward_features`` runs (its input checks included)."""
    if layers == FINAL:
        return model.forward_features(images, is_causal=False).float()
    caught = {}
    hooks = [model.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: caught.__setitem__(i, out))
             for i in layers]
    try:
        model.forward_features(images, is_causal=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([caught[i].float() for i in layers]).mean(dim=0)


@dataclass
class Features:
    """A split's features: ``patches`` (n, N, dim) and ``pooled`` (n, dim, the patch mean) arrays (memory
    mapped when cached), and (n,) int64 ``labels``."""
    patches: np.ndarray
    pooled: np.ndarray
    labels: np.ndarray


def _batches(n: int, batch_size: int) -> list:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def extract(model: CausalViT, split: Split, layers: Layers, *, env: DistEnv, batch_size: int = 128,
            cache_dir: Optional[str] = None, model_id: str = "", dtype: str = "float32",
            progress: bool = True, desc: str = "extract") -> Features:
    """Features of ``split`` (see the module docstring). With ``cache_dir`` they are read from the cache when
    present and written there otherwise (collective under torchrun: call on every rank); returns them on
    every rank. ``model`` is on ``env.device``, in eval mode. On CUDA extraction runs under bf16 autocast."""
    cfg = model.config
    shape = (split.n, cfg.num_patches, cfg.dim)
    key = fcache.key(model=model_id, data=split.identity, layers=describe_layers(layers), img_size=cfg.img_size,
                     dtype=dtype)
    if cache_dir is not None:
        hit = fcache.read(cache_dir, key)
        if hit is not None:
            if env.is_main:
                print(f"{desc}: cached features {fcache.entry_dir(cache_dir, key)}", flush=True)
            return Features(*hit)
        patches, pooled = fcache.begin_write(cache_dir, key, shape, dtype, split.labels, env)
    elif env.distributed:
        raise ValueError("under torchrun the ranks exchange features through the cache: drop --no-cache")
    else:
        patches, pooled = np.empty(shape, dtype), np.empty((split.n, cfg.dim), dtype)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else contextlib.nullcontext()
    batches = _batches(split.n, batch_size)
    mine = batches[env.rank::env.world]
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=desc, unit="batch", dynamic_ncols=True, disable=None)  # on a terminal only
        bar = None if bar.disable else bar
    for idx, images in zip(mine, split.batches(mine)):
        with autocast:  # uint8 images normalized on the device, as the training step does
            images = model_input(images.to(env.device, non_blocking=True), cfg.in_chans)
            feats = layer_features(model, images, layers)
        rows = slice(idx[0], idx[-1] + 1)
        patches[rows] = feats.cpu().numpy().astype(dtype)
        pooled[rows] = feats.mean(dim=1).cpu().numpy().astype(dtype)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if cache_dir is None:
        _check_finite(patches, desc)
        return Features(patches, pooled, split.labels)
    del patches, pooled  # flush this rank's rows before the others read them
    fcache.end_write(cache_dir, key, env, meta={"layers": describe_layers(layers), "shape": shape, "dtype": dtype,
                                                "data": split.identity, "model": model_id})
    barrier(env)
    hit = fcache.read(cache_dir, key)
    _check_finite(hit[0], desc)
    return Features(*hit)


def _check_finite(patches: np.ndarray, desc: str) -> None:
    # A float16 cache overflows on features beyond 65504 (huge activations of some large ViTs).
    step = max(1, patches.shape[0] // 64)
    if not np.isfinite(patches[::step]).all():
        raise FloatingPointError(f"{desc}: non-finite features; with --feature-dtype float16 try float32")
