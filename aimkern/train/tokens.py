"""The token objective's tokenizer: aimkern's k-means patch tokenizer, loaded or fitted on the fly.

Imported only for ``--objective token``, so the pixel objective never needs ``aimkern.tokenizers``.
A tokenizer fitted here is saved as ``OUT/tokenizer.pt`` by rank 0 (the others wait, then load it), and a
resumed run loads that file again, so the targets of a resumed run are the ones it started with.
"""
from __future__ import annotations

import itertools
import os

import torch

from .distributed import DistEnv, barrier

TOKENIZER_NAME = "tokenizer.pt"


def _tokenizer_class():
    try:
        from ..tokenizers import KMeansPatchTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("--objective token needs aimkern.tokenizers.KMeansPatchTokenizer, which is missing") from e
    return KMeansPatchTokenizer


def prepare_tokenizer(*, path: str | None, out_dir: str, resume: bool, vocab_size: int, patch_size: int,
                      fit_batches, fit_images: int, env: DistEnv):
    """Load ``path`` (``--tokenizer``), or OUT's fitted tokenizer when resuming, or fit one on the first
    ``fit_images`` images of ``fit_batches`` (an iterable of (B, C, H, W) images), saved into ``out_dir``."""
    cls = _tokenizer_class()
    saved = os.path.join(out_dir, TOKENIZER_NAME)
    if path is None and resume and os.path.isfile(saved):
        path = saved
    if path is None:
        if env.is_main:
            first = next(iter(fit_batches))
            n_batches = max(1, -(-fit_images // first.shape[0]))
            batches = [first] + list(itertools.islice(iter(fit_batches), 1, n_batches))
            tok = cls(vocab_size=vocab_size, patch_size=patch_size)
            tok.fit(torch.cat(batches)[:fit_images])
            os.makedirs(out_dir, exist_ok=True)
            tok.save(saved)
        barrier(env)
        path = saved
    tok = cls.load(path)
    if getattr(tok, "patch_size", patch_size) != patch_size:
        raise ValueError(f"--tokenizer {path}: patch_size {tok.patch_size} differs from the model's {patch_size}")
    return tok


def tokenizer_vocab_size(tok, default: int) -> int:
    return int(getattr(tok, "vocab_size", default))


@torch.no_grad()
def encode(tok, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N) int64 token ids of the patches in raster order, on the images' device."""
    return tok.encode(images).to(images.device, torch.int64)
