"""Native-resolution packing: images of any size cut into patches, one sequence per image, laid end to end.

(Not to be confused with ``aimkern.data.pack``, which writes an image folder into WebDataset shards.)

``pack_images(images, P)`` turns a list of (C, H_i, W_i) images into a ``PackedImages``: the patches of
all images as one (T, P*P*C) tensor, image i's h_i * w_i patches in raster order at tokens
[cu_seqlens[i], cu_seqlens[i + 1]), plus each image's grid and each token's (row, col). That is the layout
of the varlen attention kernels (q, k, v (T, H, D) with cu_seqlens) and of the varlen pixel loss.

``pack_to_budget(images, P, tokens)`` packs into a fixed number of tokens (fixed shapes every training
step): images in data order, first fit, and one padding sequence for the unused tail. ``first_fit`` is
its plan on lengths alone.

Patch values stay in the images' dtype (uint8 stays uint8: 4x less to move than float32; the device
normalizes them), in MAE / AIM (p, q, c) order, the order of the pixel loss's targets
(``aimkern.reference.patchify(..., order="pqc")``, used here).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..reference.patch_embed import patchify
from .collate import worker_buffer

PrefixLen = Union[None, int, Sequence[int], torch.Tensor]
INDEX_DTYPE = torch.int32  # cu_seqlens, grid, coords and prefix_len: what the varlen kernels read


@dataclass(frozen=True)
class PackedImages:
    """S images packed into T tokens. Tensors live on one device; ``to`` moves them all.

    patches:    (T, P*P*C) in the images' dtype, MAE / AIM (p, q, c) order inside a patch.
    cu_seqlens: int32 (S + 1,), 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T; sequence s holds tokens
                [cu_seqlens[s], cu_seqlens[s + 1]) in raster order.
    grid:       int32 (S, 2), sequence s's (h_s, w_s) in patches (h_s * w_s = its length).
    coords:     int32 (T, 2), each token's (row, col) in its image's grid.
    prefix_len: None or int32 (S,), each sequence's prefix (AIM's bidirectional context, no loss targets).
    patch_size: P.
    max_seqlen: the longest sequence, a host int (sizes the attention grid without reading cu_seqlens).
    num_images: sequences [0, num_images) are images; the rest (``pack_to_budget``) are padding: one
                sequence for the unused tokens, with prefix_len = its length so it holds no loss target,
                then empty sequences up to a fixed S.
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    grid: torch.Tensor
    coords: torch.Tensor
    prefix_len: Optional[torch.Tensor]
    patch_size: int
    max_seqlen: int
    num_images: int

    def __post_init__(self):
        s, t = self.grid.shape[0], self.patches.shape[0]
        shapes = dict(cu_seqlens=(s + 1,), grid=(s, 2), coords=(t, 2))
        if self.prefix_len is not None:
            shapes["prefix_len"] = (s,)
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"PackedImages: {name} must have shape {shape} (S={s}, T={t}), got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.patches.dim() != 2:
            raise ValueError(f"PackedImages: patches must be (T, P*P*C), got {tuple(self.patches.shape)}")
        if not 0 <= self.num_images <= s:
            raise ValueError(f"PackedImages: num_images must be in [0, S={s}], got {self.num_images}")

    @property
    def num_sequences(self) -> int:
        return self.grid.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[0]

    @property
    def seqlens(self) -> torch.Tensor:
        """(S,) int32 sequence lengths (on the pack's device)."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def _map(self, fn) -> "PackedImages":
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **{name: fn(t) for name, t in tensors.items()})

    def to(self, device, non_blocking: bool = False) -> "PackedImages":
        """The pack on ``device`` (every tensor; dtypes kept)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedImages":
        """Every tensor in page-locked memory (DataLoader ``pin_memory=True`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def cat(cls, packs: Sequence["PackedImages"]) -> "PackedImages":
        """Packs laid end to end, as one pack (a DataLoader ``collate_fn`` for datasets that yield packs).
        Only the last pack may hold padding sequences."""
        if not packs:
            raise ValueError("PackedImages.cat: needs at least one pack")
        first = packs[0]
        for i, p in enumerate(packs):
            if not isinstance(p, PackedImages):
                raise TypeError(f"PackedImages.cat: packs[{i}] is a {type(p).__name__}, not a PackedImages")
            if p.patch_size != first.patch_size or p.patches.shape[1] != first.patches.shape[1]:
                raise ValueError(f"PackedImages.cat: packs[{i}] has patch size {p.patch_size} and "
                                 f"{p.patches.shape[1]} values a patch; packs[0] {first.patch_size} and "
                                 f"{first.patches.shape[1]}")
            if p.patches.dtype != first.patches.dtype:
                raise TypeError(f"PackedImages.cat: packs[{i}] patches are {p.patches.dtype}, packs[0] "
                                f"{first.patches.dtype}")
            if i < len(packs) - 1 and p.num_images != p.num_sequences:
                raise ValueError(f"PackedImages.cat: packs[{i}] holds padding sequences; only the last pack may")
        offsets = [0]
        for p in packs:
            offsets.append(offsets[-1] + p.num_tokens)
        cu = torch.cat([first.cu_seqlens[:1]] + [p.cu_seqlens[1:] + off for p, off in zip(packs, offsets)])
        prefix = None
        if any(p.prefix_len is not None for p in packs):  # prefix 0 is no prefix
            prefix = torch.cat([p.prefix_len if p.prefix_len is not None else torch.zeros_like(p.cu_seqlens[1:])
                                for p in packs])
        return cls(patches=torch.cat([p.patches for p in packs]), cu_seqlens=cu.to(INDEX_DTYPE),
                   grid=torch.cat([p.grid for p in packs]), coords=torch.cat([p.coords for p in packs]),
                   prefix_len=prefix, patch_size=first.patch_size, max_seqlen=max(p.max_seqlen for p in packs),
                   num_images=sum(p.num_images for p in packs))

    collate = cat


# ------------------------------------------------------------------------------------------- packing
def _check_images(images, patch_size: int) -> List[Tuple[int, int]]:
    """Every image's (h_i, w_i) grid, after the checks (a ValueError / TypeError naming the image)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"pack_images: patch_size must be an int >= 1, got {patch_size!r}")
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("pack_images: images must be a non-empty list of (C, H, W) tensors")
    grids = []
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor):
            raise TypeError(f"pack_images: images[{i}] must be a torch.Tensor, got {type(im).__name__}")
        if im.dim() != 3:
            raise ValueError(f"pack_images: images[{i}] must be (C, H, W), got shape {tuple(im.shape)}")
        if im.dtype != torch.uint8 and not im.dtype.is_floating_point:
            raise TypeError(f"pack_images: images[{i}] must be uint8 or floating point, got {im.dtype}")
        first = images[0]
        if (im.shape[0], im.dtype, im.device) != (first.shape[0], first.dtype, first.device):
            raise ValueError(f"pack_images: images[{i}] is {im.shape[0]}-channel {im.dtype} on {im.device}, "
                             f"images[0] {first.shape[0]}-channel {first.dtype} on {first.device}; "
                             "all must match")
        _, h, w = im.shape
        if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
            raise ValueError(f"pack_images: images[{i}] is {h} x {w}; H and W must be positive multiples of the "
                             f"patch size {patch_size}")
        grids.append((h // patch_size, w // patch_size))
    return grids


def _prefixes(prefix_len: PrefixLen, lengths: Sequence[int]) -> Optional[List[int]]:
    """None or one checked prefix per image (an int applies to all), each in [0, n_i]."""
    if prefix_len is None:
        return None
    if isinstance(prefix_len, bool):
        raise TypeError("pack_images: prefix_len must be None, an int, or one int per image, got a bool")
    if isinstance(prefix_len, int):
        values = [prefix_len] * len(lengths)
    else:
        if isinstance(prefix_len, torch.Tensor) and (prefix_len.dtype.is_floating_point or prefix_len.dim() != 1):
            raise TypeError(f"pack_images: prefix_len must be a 1-D integer tensor, got {prefix_len.dtype} "
                            f"{tuple(prefix_len.shape)}")
        values = [int(p) for p in (prefix_len.tolist() if isinstance(prefix_len, torch.Tensor) else prefix_len)]
        if len(values) != len(lengths):
            raise ValueError(f"pack_images: prefix_len has {len(values)} values for {len(lengths)} images")
    for i, (p, n) in enumerate(zip(values, lengths)):
        if not 0 <= p <= n:
            raise ValueError(f"pack_images: prefix_len[{i}] = {p} is outside [0, {n}] (image {i} has {n} patches)")
    return values


def _raster(h: int, w: int, device) -> torch.Tensor:
    """(h * w, 2) int32 (row, col) in raster order."""
    rows = torch.arange(h, dtype=INDEX_DTYPE, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=INDEX_DTYPE, device=device).repeat(h)
    return torch.stack([rows, cols], dim=1)


def _assemble(images, patch_size: int, grids, prefixes: Optional[List[int]], pad: int, sequences: int
              ) -> PackedImages:
    """The pack of ``images`` (checked), then a padding sequence of ``pad`` tokens if pad > 0, then empty
    sequences up to ``sequences``."""
    first = images[0]
    device = first.device
    lengths = [h * w for h, w in grids]
    seq_grids = list(grids) + ([(1, pad)] if pad else [])
    seq_grids += [(0, 0)] * (sequences - len(seq_grids))
    seq_lens = [h * w for h, w in seq_grids]
    t = sum(seq_lens)
    patches = worker_buffer(first, (t, patch_size * patch_size * first.shape[0]))
    start = 0
    for im, n in zip(images, lengths):
        patches[start:start + n] = patchify(im.unsqueeze(0), patch_size, order="pqc")[0]
        start += n
    patches[start:].zero_()
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(seq_lens, dtype=torch.int64).cumsum(0)
    prefix = None
    if prefixes is not None or pad:
        # The padding sequence's prefix is its length: it holds no loss target. Images without a prefix get
        # 0, which is no prefix for the causal mask and for the loss.
        values = (prefixes or [0] * len(images)) + ([pad] if pad else [])
        values += [0] * (len(seq_lens) - len(values))
        prefix = torch.tensor(values, dtype=INDEX_DTYPE, device=device)
    return PackedImages(
        patches=patches,
        cu_seqlens=cu.to(device=device, dtype=INDEX_DTYPE),
        grid=torch.tensor(seq_grids, dtype=INDEX_DTYPE, device=device).view(-1, 2),
        coords=torch.cat([_raster(h, w, device) for h, w in seq_grids]) if t else
        torch.zeros((0, 2), dtype=INDEX_DTYPE, device=device),
        prefix_len=prefix, patch_size=patch_size, max_seqlen=max(seq_lens), num_images=len(images),
    )


def pack_images(images: Sequence[torch.Tensor], patch_size: int, *, prefix_len: PrefixLen = None) -> PackedImages:
    """Pack (C, H_i, W_i) images (uint8 or float, one dtype and channel count, H_i and W_i positive
    multiples of patch_size) into one ``PackedImages``, image i as sequence i.

    prefix_len: None, an int for every image, or one int per image (a list or an (S,) tensor), each in
    [0, h_i * w_i]. Usable as a DataLoader ``collate_fn`` (``functools.partial(pack_images, patch_size=P)``):
    inside a worker the patches are written into shared memory, so the pack reaches the main process with
    no further copy.
    """
    grids = _check_images(images, patch_size)
    prefixes = _prefixes(prefix_len, [h * w for h, w in grids])
    return _assemble(images, patch_size, grids, prefixes, pad=0, sequences=len(images))


def first_fit(lengths: Sequence[int], tokens: int, max_images: Optional[int] = None) -> List[int]:
    """Indices of the images that go into one pack of ``tokens`` tokens, in data order: each image is taken
    when it fits in what is left (a later, smaller image may fill a gap a larger one left), up to
    ``max_images``. An image longer than ``tokens`` can never be packed: a ValueError names it."""
    taken, left = [], tokens
    for i, n in enumerate(lengths):
        if n > tokens:
            raise ValueError(f"first_fit: image {i} has {n} patches, more than the budget of {tokens} tokens")
        if max_images is not None and len(taken) == max_images:
            break
        if n <= left:
            taken.append(i)
            left -= n
    return taken


def pack_to_budget(images: Sequence[torch.Tensor], patch_size: int, tokens: int, *, prefix_len: PrefixLen = None,
                   sequences: Optional[int] = None) -> Tuple[PackedImages, List[int]]:
    """Pack images into exactly ``tokens`` tokens: the images ``first_fit`` takes, in data order, then one
    padding sequence for the unused tokens (zero patches, prefix_len = its length: no loss target).

    sequences: when given, the pack has exactly that many sequences (at most sequences - 1 images, the
    padding sequence, then empty ones), so cu_seqlens, grid and prefix_len have fixed shapes too.
    prefix_len: as in ``pack_images``, one value per input image. Returns (pack, indices of the images taken);
    the caller keeps the others for the next pack.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"pack_to_budget: tokens must be an int >= 1, got {tokens!r}")
    if sequences is not None and (isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 2):
        raise ValueError(f"pack_to_budget: sequences must be None or an int >= 2 (images + padding), got {sequences!r}")
    grids = _check_images(images, patch_size)
    lengths = [h * w for h, w in grids]
    prefixes = _prefixes(prefix_len, lengths)
    taken = first_fit(lengths, tokens, None if sequences is None else sequences - 1)
    used = sum(lengths[i] for i in taken)
    pad = tokens - used
    n_seq = len(taken) + (1 if pad else 0)
    pack = _assemble([images[i] for i in taken], patch_size, [grids[i] for i in taken],
                     None if prefixes is None else [prefixes[i] for i in taken], pad,
                     n_seq if sequences is None else sequences)
    return pack, taken
