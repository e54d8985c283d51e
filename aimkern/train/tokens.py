"""The token objective's tokenizer: aimkern's k-means patch tokenizer, loaded or fitted on the fly.

Imported only for ``--objective token``, so the pixel objective never needs ``aimkern.tokenizers``.
A tokenizer fitted here is saved as ``OUT/tokenizer.pt`` by rank 0 (the others wait, then load it), and a
resumed run loads that file again, so the targets of a resumed run are the ones it started with.

A fit on the fly says what it does before it starts (centroids, patches, device), estimates its time from
one timed nearest-centroid pass, warns when that is long for the device (a large vocabulary on a CPU), and
shows a progress bar over its k-means iterations (when stderr is a terminal).
"""
from __future__ import annotations

import itertools
import os
import time

import torch

from ..distributed import DistEnv, barrier

TOKENIZER_NAME = "tokenizer.pt"
SLOW_FIT_S = 300.0  # warn above this estimate


def estimate_fit_seconds(tok, patches: torch.Tensor) -> float:
    """Seconds a fit of ``tok`` on ``patches`` (M, D) should take: one timed nearest-centroid pass of a chunk
    against vocab_size random patches, scaled to M patches and to the passes of a fit (the k-means++ seeding
    costs about one, and each Lloyd iteration one)."""
    m, k = patches.shape[0], tok.vocab_size
    chunk = patches[: min(m, 1024)]
    centroids = patches[torch.randint(m, (k,), generator=torch.Generator().manual_seed(0)).to(patches.device)]
    t0 = time.perf_counter()
    tok.assign(chunk, centroids)
    if patches.is_cuda:
        torch.cuda.synchronize(patches.device)
    per_pass = (time.perf_counter() - t0) * m / chunk.shape[0]
    return per_pass * (1 + tok.iters)


def _fit_with_progress(tok, images: torch.Tensor, env: DistEnv, progress: bool) -> None:
    patches = tok.patches(images).reshape(-1, tok.patch_size**2 * images.shape[1])
    est = estimate_fit_seconds(tok, patches)
    print(f"fitting a k-means tokenizer: {tok.vocab_size} centroids on {patches.shape[0]} patches of "
          f"{patches.shape[1]} values on {images.device.type}, about {est:.0f}s (estimated)", flush=True)
    if est > SLOW_FIT_S:
        print(f"warning: --vocab-size {tok.vocab_size} is large for {images.device.type}: the fit may take "
              f"{est / 60:.0f} min; use a smaller --vocab-size or --tokenizer-images, fit on a GPU, or pass a "
              "saved --tokenizer", flush=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (a scheduler's log), as the training bar
        bar = tqdm(total=1 + tok.iters, desc="tokenizer fit", unit="pass", dynamic_ncols=True, disable=None)
        bar = None if bar.disable else bar

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    t0 = time.perf_counter()
    tok.fit(images, progress=report)
    if bar is not None:
        bar.close()
    print(f"tokenizer fitted in {time.perf_counter() - t0:.1f}s ({len(tok.inertia_)} k-means iterations)",
          flush=True)


def _tokenizer_class():
    try:
        from ..tokenizers import KMeansPatchTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("--objective token needs aimkern.tokenizers.KMeansPatchTokenizer, which is missing") from e
    return KMeansPatchTokenizer


def prepare_tokenizer(*, path: str | None, out_dir: str, resume: bool, vocab_size: int, patch_size: int,
                      fit_batches, fit_images: int, env: DistEnv, progress: bool = True):
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
            _fit_with_progress(tok, torch.cat(batches)[:fit_images], env, progress)
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
    """(B, C, H, W) normalized images -> (B, N) int64 token ids of the patches in raster order, on the images'
    device. Runs in float32 even inside the step's autocast: the ids are those of the fitted centroids, and a
    bf16 distance would pick other ones."""
    with torch.autocast(images.device.type, enabled=False):
        return tok.encode(images).to(images.device, torch.int64)
