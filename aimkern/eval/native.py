"""``python -m aimkern.eval MODEL --native``: per-image features at native resolution.

Each image of the ``--train`` / ``--val`` trees is read whole (no crop, no flip) at its own patch grid, or,
above ``--max-patches`` patches, shrunk at its aspect ratio to the largest grid within them
(``aimkern.data.native.native_grid``, as in training), and a
batch of them is packed end to end (``aimkern.pack_images``) through ``CausalViT.forward_features_packed``
with full attention. An image's feature is the mean over its own patches of the chosen blocks' outputs (as
the square path pools), so the linear and k-NN probes run on them unchanged. The attentive probe reads
fixed-length patch features and is refused; extraction runs in one process, without the feature cache.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import torch

from ..data.native import resize_native
from ..data.decode import open_image, pil_pixels
from ..data.packing import pack_images
from ..models.packed import token_sequence
from .features import FINAL, Features


class NativeDecode:
    """Encoded bytes -> uint8 (C, rows * P, cols * P): the whole image at its aspect ratio, <= max_patches."""

    def __init__(self, patch_size: int, max_patches: int, in_chans: int):
        self.p, self.n, self.c = patch_size, max_patches, in_chans

    def __call__(self, data: bytes) -> torch.Tensor:
        pixels, box, flip = pil_pixels(open_image(data), lambda w, h: ((0, 0, w, h), False), self.c)
        return resize_native(pixels, box, flip, self.p, self.n)


def collate_list(items):
    """A batch of (image, label) of different sizes -> the list of images (the labels are the split's)."""
    return [image for image, _ in items]


@torch.no_grad()
def packed_layer_features(model, images: List[torch.Tensor], layers, device) -> torch.Tensor:
    """(S, dim) float32: each image's patch mean of the chosen blocks' outputs (or of the final features),
    under full attention, the images packed into one sequence set."""
    pack = pack_images(images, model.config.patch_size).to(device)
    caught = {}
    hooks = [] if layers == FINAL else [
        model.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: caught.__setitem__(i, out)) for i in layers]
    try:
        final = model.forward_features_packed(pack, is_causal=False)
    finally:
        for h in hooks:
            h.remove()
    feats = final.float() if layers == FINAL else torch.stack([caught[i].float() for i in layers]).mean(dim=0)
    seq = token_sequence(pack.cu_seqlens, pack.num_tokens)
    sums = torch.zeros(pack.num_sequences, feats.shape[1], device=device).index_add_(0, seq, feats)
    return sums / pack.seqlens.clamp_min(1).unsqueeze(1).float()


def extract_native(model, split, layers, *, env, batch_size: int, dtype: str = "float32",
                   progress: bool = False, desc: str = "extract") -> Features:
    """A split's native-resolution features: ``pooled`` (n, dim); ``patches`` is an empty (n, 0, dim) array."""
    if env.distributed:
        raise ValueError("--native extracts in one process (no torchrun)")
    dim = model.config.dim
    pooled = np.empty((split.n, dim), dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else contextlib.nullcontext()
    batches = [list(range(s, min(split.n, s + batch_size))) for s in range(0, split.n, batch_size)]
    for idx, images in zip(batches, split.batches(batches)):
        with autocast:
            feats = packed_layer_features(model, images, layers, env.device)
        pooled[idx[0]:idx[-1] + 1] = feats.cpu().numpy().astype(dtype)
    if not np.isfinite(pooled).all():
        raise FloatingPointError(f"{desc}: non-finite features")
    return Features(np.empty((split.n, 0, dim), dtype), pooled, split.labels)


def check_native(args, max_patches: Optional[int]) -> None:
    """--native's conditions, a ValueError naming what to change."""
    if not (args.train and args.val):
        raise ValueError("--native reads ImageFolder trees: give --train DIR --val DIR")
    if "attentive" in args.probes:
        raise ValueError("--native: the attentive probe takes fixed-length patch features; use "
                         "--probes linear,knn")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"--max-patches must be >= 1, got {max_patches}")
