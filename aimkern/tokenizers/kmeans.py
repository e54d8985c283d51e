"""KMeansPatchTokenizer: an open patch tokenizer for the token objective (AIM-style papers use a private dVAE).

A token id is the nearest of ``vocab_size`` centroids to a patch's normalized pixels: the patch in MAE/AIM
(p, q, c) order, standardized with its own mean and unbiased variance (exactly
``aimkern.ops.pixel_loss.patch_targets``), so the ids ignore a patch's brightness and contrast and code its shape.
The centroids are fit by k-means (Lloyd) after a batched k-means++ seeding, on the device the images live on.

Memory: the nearest-centroid search runs over chunks of patches, so at most (chunk x vocab_size) distances
exist at a time, never (patches x vocab_size).

    tok = KMeansPatchTokenizer(vocab_size=8192, patch_size=16).fit(loader_of_image_batches)
    ids = tok.encode(images)             # (B, N) int64, raster order
    patches = tok.decode(ids)            # (B, N, P*P*C) normalized-pixel centroids
    tok.save("tok.pt"); tok = KMeansPatchTokenizer.load("tok.pt")
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch

from ..ops.pixel_loss import patch_targets as pixel_targets

_FORMAT = "aimkern.KMeansPatchTokenizer"
_VERSION = 1
ImagesOrBatches = Union[torch.Tensor, Iterable]


class KMeansPatchTokenizer:
    """Map image patches to ids in [0, vocab_size) by nearest centroid in normalized-pixel space.

    Args:
        vocab_size: number of centroids K (token ids).
        patch_size: P; images must have H and W multiples of P.
        norm_pix: standardize each patch before clustering (as the pixel objective does).
        eps: variance epsilon of that standardization.
        iters: maximum Lloyd iterations of ``fit``; it stops earlier when the mean squared distance
            improves by less than ``tol`` (relative).
        chunk_size: patches per nearest-centroid chunk (the (chunk, K) distance block is the peak memory).
        seed_rounds: batched k-means++: the K seeds are drawn in at most this many rounds, each round
            sampling K / seed_rounds new seeds with probability proportional to the squared distance to the
            nearest seed so far (exact k-means++ when K <= seed_rounds + 1).
        seed: random seed of the seeding (CPU fits are reproducible; on CUDA the centroid sums use
            index_add_, whose atomics may vary in the last bits).
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        patch_size: int = 16,
        *,
        norm_pix: bool = True,
        eps: float = 1e-6,
        iters: int = 20,
        tol: float = 1e-4,
        chunk_size: int = 4096,
        seed_rounds: int = 32,
        seed: int = 0,
    ):
        for name, value, lo in (
            ("vocab_size", vocab_size, 2), ("patch_size", patch_size, 1), ("iters", iters, 0),
            ("chunk_size", chunk_size, 1), ("seed_rounds", seed_rounds, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"KMeansPatchTokenizer: {name} must be an int >= {lo}, got {value!r}")
        if eps < 0 or tol < 0:
            raise ValueError(f"KMeansPatchTokenizer: eps and tol must be >= 0, got {eps} and {tol}")
        self.vocab_size = vocab_size
        self.patch_size = patch_size
        self.norm_pix = bool(norm_pix)
        self.eps = float(eps)
        self.iters = iters
        self.tol = float(tol)
        self.chunk_size = chunk_size
        self.seed_rounds = seed_rounds
        self.seed = seed
        self.in_chans: Optional[int] = None
        self.centroids: Optional[torch.Tensor] = None  # (K, P*P*C) float32, once fit
        self.inertia_: list[float] = []  # mean squared distance to the nearest centroid, per Lloyd step

    # --------------------------------------------------------------------------------------- helpers
    @property
    def fitted(self) -> bool:
        return self.centroids is not None

    @property
    def patch_dim(self) -> Optional[int]:
        return None if self.in_chans is None else self.patch_size**2 * self.in_chans

    def __repr__(self) -> str:
        return (
            f"KMeansPatchTokenizer(vocab_size={self.vocab_size}, patch_size={self.patch_size}, "
            f"in_chans={self.in_chans}, norm_pix={self.norm_pix}, fitted={self.fitted})"
        )

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, P*P*C) float32 patches in (p, q, c) order, standardized if norm_pix."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"KMeansPatchTokenizer: images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"KMeansPatchTokenizer: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"KMeansPatchTokenizer: images must be floating point, got {images.dtype}")
        _, c, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"KMeansPatchTokenizer: image H={h} and W={w} must be multiples of patch_size={p}")
        if self.in_chans is not None and c != self.in_chans:
            raise ValueError(
                f"KMeansPatchTokenizer: images have {c} channels, the tokenizer was fit on {self.in_chans}"
            )
        return pixel_targets(images, p, self.norm_pix, self.eps).float()

    def _centroids_on(self, device: torch.device) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("KMeansPatchTokenizer: call fit() (or load()) before encode/decode")
        if self.centroids.device != device:
            self.centroids = self.centroids.to(device)  # follow the data: one move, not one per call
        return self.centroids

    def to(self, device) -> "KMeansPatchTokenizer":
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)
        return self

    # ------------------------------------------------------------------------------------ assignment
    def assign(self, x: torch.Tensor, centroids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each row of x (M, D): (ids (M,) int64, squared distances (M,) float32).

        Chunked over rows: the (chunk, K) distance block is the only large temporary.
        """
        c = self._centroids_on(x.device) if centroids is None else centroids
        c_sq = (c * c).sum(1)
        ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        d2 = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], self.chunk_size):
            xc = x[start : start + self.chunk_size]
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin, so it is added after.
            dist = torch.addmm(c_sq, xc, c.t(), alpha=-2.0)
            best, idx = dist.min(dim=1)
            ids[start : start + xc.shape[0]] = idx
            d2[start : start + xc.shape[0]] = (best + (xc * xc).sum(1)).clamp_min_(0.0)
        return ids, d2

    # ------------------------------------------------------------------------------------------- fit
    def _gather(self, data: ImagesOrBatches, max_patches: Optional[int]) -> torch.Tensor:
        bad_cap = isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1
        if max_patches is not None and bad_cap:
            raise ValueError(f"KMeansPatchTokenizer.fit: max_patches must be None or an int >= 1, got {max_patches!r}")
        batches = [data] if isinstance(data, torch.Tensor) else data
        self.in_chans = None  # a new fit may see a different channel count; taken from the first batch
        parts, total = [], 0
        for batch in batches:
            if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
                batch = batch[0]
            if self.in_chans is None and isinstance(batch, torch.Tensor) and batch.dim() == 4:
                self.in_chans = batch.shape[1]
            x = self.patches(batch).reshape(-1, self.patch_dim)
            if max_patches is not None:
                x = x[: max_patches - total]
            parts.append(x)
            total += x.shape[0]
            if max_patches is not None and total >= max_patches:
                break
        if not parts:
            raise ValueError("KMeansPatchTokenizer.fit: got no image batches")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _seed(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Batched k-means++: rounds of seeds sampled proportionally to the squared distance to the nearest seed."""
        m, k = x.shape[0], self.vocab_size
        first = torch.randint(m, (1,), generator=gen, device=x.device)
        centers = [x[first]]
        d2 = self.assign(x, centers[0])[1]
        per_round = max(1, math.ceil((k - 1) / self.seed_rounds))
        have = 1
        while have < k:
            r = min(per_round, k - have)
            # Weighted sampling without replacement by exponential keys, log(u) / w (largest r win): unlike
            # torch.multinomial this has no 2**24 limit on the number of patches.
            u = torch.rand(m, generator=gen, device=x.device).clamp_min_(1e-12)
            keys = torch.log(u) / d2.clamp_min(1e-30)
            new = x[keys.topk(r).indices]
            centers.append(new)
            d2 = torch.minimum(d2, self.assign(x, new)[1])
            have += r
        return torch.cat(centers)

    def fit(
        self, data: ImagesOrBatches, *, max_patches: Optional[int] = None, verbose: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "KMeansPatchTokenizer":
        """Fit the centroids on images: a (B, C, H, W) tensor, or an iterable of such batches (or of tuples
        whose first item is the batch). All patches are gathered (up to ``max_patches``, the first ones), on
        the device of the batches: pass CUDA tensors to fit on the GPU. ``progress(done, total)`` is called
        after the seeding (done = 1) and after each Lloyd iteration, total = 1 + iters (it may stop early).
        Returns self.
        """
        x = self._gather(data, max_patches)
        m, k = x.shape[0], self.vocab_size
        if m < k:
            raise ValueError(f"KMeansPatchTokenizer.fit: needs at least vocab_size={k} patches, got {m}")
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        c = self._seed(x, gen)
        if progress is not None:
            progress(1, 1 + self.iters)
        self.inertia_ = []
        for it in range(self.iters):
            ids, d2 = self.assign(x, c)
            inertia = d2.mean().item()
            self.inertia_.append(inertia)
            if verbose:
                print(f"k-means step {it}: mean squared distance {inertia:.5f}")
            if progress is not None:
                progress(2 + it, 1 + self.iters)
            counts = torch.bincount(ids, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, ids, x)
            c = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                # Re-seed empty clusters at the patches worst served so far (largest distances).
                c[empty] = x[d2.topk(empty.numel()).indices]
            elif len(self.inertia_) > 1 and self.inertia_[-2] - inertia <= self.tol * self.inertia_[-2]:
                break
        self.centroids = c.contiguous()
        return self

    # ----------------------------------------------------------------------------------- encode/decode
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N) int64 token ids (raster order), on the images' device."""
        x = self.patches(images)
        b, n, d = x.shape
        return self.assign(x.reshape(b * n, d))[0].reshape(b, n)

    __call__ = encode

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids -> (B, N, P*P*C) centroid patches in normalized-pixel space, (p, q, c) order."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError("KMeansPatchTokenizer.decode: ids must be an integer tensor")
        c = self._centroids_on(ids.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"KMeansPatchTokenizer.decode: ids must be in [0, {self.vocab_size})")
        return c[ids.long()]

    # ------------------------------------------------------------------------------------- save/load
    def state_dict(self) -> dict:
        if self.centroids is None:
            raise RuntimeError("KMeansPatchTokenizer: nothing to save before fit()")
        return {
            "format": _FORMAT, "version": _VERSION,
            "vocab_size": self.vocab_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
            "norm_pix": self.norm_pix, "eps": self.eps, "iters": self.iters, "tol": self.tol,
            "chunk_size": self.chunk_size, "seed_rounds": self.seed_rounds, "seed": self.seed,
            "centroids": self.centroids.detach().cpu(), "inertia": list(self.inertia_),
        }

    def save(self, path) -> None:
        """Write the config and centroids (torch.save of a plain dict: loadable with weights_only=True)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "KMeansPatchTokenizer":
        """Read a tokenizer written by ``save`` (safe: ``torch.load(weights_only=True)``)."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"KMeansPatchTokenizer.load: {path} is not a saved KMeansPatchTokenizer")
        if state.get("version") != _VERSION:
            raise ValueError(f"KMeansPatchTokenizer.load: unsupported version {state.get('version')}")
        tok = cls(
            state["vocab_size"], state["patch_size"], norm_pix=state["norm_pix"], eps=state["eps"],
            iters=state["iters"], tol=state["tol"], chunk_size=state["chunk_size"],
            seed_rounds=state["seed_rounds"], seed=state["seed"],
        )
        tok.in_chans = state["in_chans"]
        tok.centroids = state["centroids"].float().contiguous()
        tok.inertia_ = list(state["inertia"])
        expected = (tok.vocab_size, tok.patch_dim)
        if tuple(tok.centroids.shape) != expected:
            got = tuple(tok.centroids.shape)
            raise ValueError(f"KMeansPatchTokenizer.load: centroids of shape {got}, want {expected}")
        return tok
