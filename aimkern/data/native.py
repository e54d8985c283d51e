"""Native-resolution training data (``python -m aimkern.train --native``): images of an ImageFolder tree or
WebDataset shards at their own aspect ratio, packed first fit into a fixed number of tokens per step.

Per sample (a DataLoader worker, ``NativeImages``): decode, AIM's augmentation adapted to native sizes
(``native_view``: a random-resized crop of 40-100 % of the area whose aspect ratio is the image's own times a
factor in [3/4, 4/3], and a horizontal flip, drawn from the sample's seed alone), then a resize of the crop
to its own patch grid, or, above ``max_patches`` patches, the largest grid within them at the crop's aspect
ratio (``native_grid``: small images are not enlarged), in uint8.

Per step (the main process, ``NativePackStream``): the rank reads its global positions r, r + W, r + 2W, ...
in order; each pack takes, in that order, every image that fits in what is left of ``tokens`` (first fit),
starting with the images earlier packs skipped; it stops when full, at ``max_images`` images, or after
``MAX_SKIPPED`` images that did not fit (they go first into the next pack). The unused tail is padding with no
loss target (``pack_to_budget``'s sequence, cut by ``split_padding`` into sequences of at most
``max_patches`` tokens), so every pack has the same T, number of sequences and ``max_seqlen``. The per-image prefix is drawn in [1, n_i - 1] from (seed, step, rank).

Exact resume: a pack is a pure function of the seed and the packer's state, ``state()`` = (the next position
index, the skipped ones waiting), which every checkpoint holds; a sample's pixels are a pure function of
(seed, position), so the worker count never changes a pack, and a bad sample is replaced by the seeded draw
of ``aimkern.data.bad``.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .bad import BadRecord, load_or_replace
from .decode import SCALE, RATIO, check_channels, open_image, pil_pixels
from .packing import PackedImages, pack_to_budget
from .sampling import SampleOrder, sample_seed
from .seeds import TAG_NATIVE_PREFIX, mix_seed

MAX_SKIPPED = 16  # images that did not fit before a pack is closed; they lead the next one
CHUNK = 8  # positions a DataLoader batch decodes


def native_grid(width: float, height: float, max_patches: int, patch_size: Optional[int] = None
                ) -> Tuple[int, int]:
    """The (rows, cols) patch grid of a width x height image: its own (floor(height / P), floor(width / P),
    each >= 1) when that has at most ``max_patches`` patches (a small image is never enlarged: it would cost
    tokens and attention for no information), else the largest grid of at most ``max_patches`` patches at
    the aspect ratio width / height. ``patch_size`` None: always the largest grid within the budget."""
    if patch_size is not None:
        own = (max(1, int(height // patch_size)), max(1, int(width // patch_size)))
        if own[0] * own[1] <= max_patches:
            return own
    r = width / height
    h = max(1, int(math.floor(math.sqrt(max_patches / r))))
    w = max(1, int(math.floor(math.sqrt(max_patches * r))))
    while h * w > max_patches:  # an extreme aspect ratio clamped at 1 on one side
        if w >= h:
            w -= 1
        else:
            h -= 1
    return h, w


def native_view(width: int, height: int, seed: int):
    """The crop box (left, top, right, bottom) and flip of a sample: RandomResizedCrop's area range
    (``SCALE``) with the box's aspect ratio the image's own times a factor in ``RATIO`` (10 tries, then the
    whole image), and a flip with probability 1/2; a function of (width, height, seed) only."""
    rng = random.Random(seed)
    area, log_ratio = width * height, (math.log(RATIO[0]), math.log(RATIO[1]))
    box = (0, 0, width, height)
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = width / height * math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            box = (left, top, left + w, top + h)
            break
    return box, rng.random() < 0.5


def resize_native(pixels: np.ndarray, box, flip: bool, patch_size: int, max_patches: int) -> torch.Tensor:
    """uint8 (h, w, C) pixels -> uint8 (C, rows * P, cols * P): the box resized (antialiased bicubic, as
    ``aimkern.data.resize``) to its ``native_grid`` (at most P - 1 pixels a side when it fits the budget),
    mirrored when ``flip``."""
    left, top, right, bottom = (int(v) for v in box)
    rows, cols = native_grid(right - left, bottom - top, max_patches, patch_size)
    crop = torch.from_numpy(pixels)[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)
    crop = crop.contiguous(memory_format=torch.channels_last)
    size = (rows * patch_size, cols * patch_size)
    out = crop if tuple(crop.shape[-2:]) == size else F.interpolate(crop, size=size, mode="bicubic",
                                                                    antialias=True, align_corners=False)
    out = out[0].contiguous()
    return out.flip(-1) if flip else out


def decode_native(data: bytes, seed: int, patch_size: int, max_patches: int, in_chans: int) -> torch.Tensor:
    """Encoded bytes -> uint8 (C, rows * P, cols * P) (PIL decode; its errors are the bad-sample signal)."""
    pixels, box, flip = pil_pixels(open_image(data), lambda w, h: native_view(w, h, seed), in_chans)
    return resize_native(pixels, box, flip, patch_size, max_patches)


class FolderFiles:
    """An ImageFolder's files as a reader: ``len``, ``image_bytes(index)``, ``name(index)`` (the interface of
    ``aimkern.data.shard_stream.ShardImages``, the shards' reader)."""

    def __init__(self, paths: List[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def image_bytes(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def name(self, index: int) -> str:
        return self.paths[index]


def open_source(data: str, in_chans: int, seed: int):
    """(reader, order) of an ImageFolder tree or WebDataset shards: the samples' bytes by index, and the
    seeded order positions read them in (the dense streams' own: ``SampleOrder``, ``ShardWindowOrder``)."""
    from .order import ShardWindowOrder
    from .shards import is_shard_spec, resolve_shards

    if is_shard_spec(data):
        from .shard_stream import ShardImages

        shards = resolve_shards(data)
        return ShardImages(shards, 1, in_chans), ShardWindowOrder(shards.counts, seed)
    from torchvision.datasets import ImageFolder

    paths = [p for p, _ in ImageFolder(data).samples]
    return FolderFiles(paths), SampleOrder(len(paths), seed)


class NativeImages(torch.utils.data.Dataset):
    """A reader's samples by (index, seed) -> (uint8 (C, rows * P, cols * P), bad-sample records)."""

    def __init__(self, reader, patch_size: int, max_patches: int, in_chans: int):
        check_channels(in_chans)
        self.reader, self.p, self.n_max, self.c = reader, patch_size, max_patches, in_chans

    def __len__(self) -> int:
        return len(self.reader)

    def _load(self, index: int, seed: int) -> torch.Tensor:
        return decode_native(self.reader.image_bytes(index), seed, self.p, self.n_max, self.c)

    def __getitem__(self, key):
        index, seed = key
        return load_or_replace(lambda i: self._load(i, seed), index, n=len(self.reader), seed=seed,
                               name=self.reader.name)


def _collate(items):
    return items  # a list of (image, records): images differ in size, the packer lays them out


class _Keys(torch.utils.data.Sampler):
    """DataLoader batches of (index, seed) keys: the waiting positions first, then k = first, first + 1, ...
    (rank-local indices; global position k * world + rank)."""

    def __init__(self, order, *, pending: List[int], first: int, rank: int, world: int, seed: int):
        self.order, self.pending, self.first = order, list(pending), first
        self.rank, self.world, self.seed = rank, world, seed

    def _keys(self, ks: List[int]):
        pos = torch.tensor([k * self.world + self.rank for k in ks], dtype=torch.int64)
        idx = self.order.indices(pos)
        return [(k, i, sample_seed(self.seed, p)) for k, i, p in zip(ks, idx.tolist(), pos.tolist())]

    def __iter__(self):
        for i in range(0, len(self.pending), CHUNK):
            yield self._keys(self.pending[i:i + CHUNK])
        k = self.first
        while True:
            yield self._keys(list(range(k, k + CHUNK)))
            k += CHUNK


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        k, index, seed = key
        image, records = self.inner[(index, seed)]
        return k, image, records


class NativePackStream:
    """This rank's packs of exactly ``tokens`` tokens from an ImageFolder tree or WebDataset shards (``root``:
    what ``--data`` names; see the module docstring).

    Yields ``PackedImages`` on the CPU (uint8 patches, prefix per image, a padding sequence with no target),
    each with ``num_sequences == max_images + 1``. ``state()`` / the ``state`` argument: the packer's
    position, what a checkpoint holds (``{"next": int, "pending": [int, ...]}``)."""

    def __init__(self, root: str, *, patch_size: int, in_chans: int, max_patches: int, tokens: int,
                 max_images: int, offset: int, prefix: bool, rank: int, world: int, seed: int, first_step: int,
                 workers: int, state: Optional[dict] = None):
        if max_patches > tokens:
            raise ValueError(f"--max-patches {max_patches} must be at most --tokens-per-batch {tokens}")
        reader, order = open_source(root, in_chans, seed)
        self.num_samples, self._bad = len(reader), []
        self.p, self.tokens, self.max_images, self.offset, self.prefix = patch_size, tokens, max_images, offset, prefix
        self.n_max = max_patches
        self.rank, self.seed, self.step = rank, seed, first_step
        state = state or {"next": 0, "pending": []}
        self._next, self._pending = int(state["next"]), []  # pending: (k, image), in data order
        keys = _Keys(order, pending=list(state["pending"]), first=self._next, rank=rank, world=world, seed=seed)
        self.loader = torch.utils.data.DataLoader(
            _Keyed(NativeImages(reader, patch_size, max_patches, in_chans)), batch_sampler=keys,
            num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)
        self._items = self._decoded()
        self._waiting = len(state["pending"])  # the first items the loader yields are the pending ones
        self.tokens_total = self.tokens_padding = 0

    def _decoded(self) -> Iterator[Tuple[int, torch.Tensor, list]]:
        for chunk in self.loader:
            yield from chunk

    def _length(self, image: torch.Tensor) -> int:
        return (image.shape[1] // self.p) * (image.shape[2] // self.p)

    def state(self) -> dict:
        return {"next": self._next, "pending": [k for k, _ in self._pending]}

    def take_bad(self) -> List[BadRecord]:
        bad, self._bad = self._bad, []
        return bad

    def _pull(self) -> Tuple[int, torch.Tensor]:
        k, image, records = next(self._items)
        if self._waiting:  # a resumed run's pending images: read (and counted, if bad) before the checkpoint
            self._waiting -= 1
        else:
            self._bad.extend(records)
            self._next = k + 1
        return k, image

    def _restore_pending(self) -> None:
        while self._waiting:
            self._pending.append(self._pull())

    def next_pack(self) -> PackedImages:
        self._restore_pending()
        taken, self._pending, left = first_fit_pack(self._pending, self._pull, lambda item: self._length(item[1]),
                                                    self.tokens, self.max_images)
        images = [im for _, im in taken]
        lengths = [self._length(im) for im in images]
        prefix = None
        if self.prefix:
            gen = random.Random(mix_seed(self.seed, self.step, self.rank, TAG_NATIVE_PREFIX))
            prefix = [gen.randint(1, n - 1) if n >= 2 else n for n in lengths]
        pack, idx = pack_to_budget(images, self.p, self.tokens, prefix_len=prefix, sequences=self.max_images + 1)
        assert len(idx) == len(images)  # they were chosen to fit
        pack = split_padding(pack, self.n_max, self.max_images + padding_sequences(self.tokens, self.n_max))
        self.step += 1
        self.tokens_total += self.tokens
        self.tokens_padding += left
        return pack

    def __iter__(self) -> Iterator[PackedImages]:
        while True:
            yield self.next_pack()


def padding_sequences(tokens: int, max_patches: int) -> int:
    """Sequences the padding of a pack may take: ceil(tokens / max_patches), each at most max_patches long."""
    return -(-tokens // max_patches)


def split_padding(pack: PackedImages, max_len: int, sequences: int) -> PackedImages:
    """``pack`` with its padding (sequences from ``num_images`` on) cut into sequences of at most ``max_len``
    tokens, each its own prefix (no loss target), then empty ones up to ``sequences``; ``max_seqlen`` is
    ``max_len``. Every pack of a run then has the same T, S and max_seqlen: the shapes and host ints a
    compiled step specializes on never change, and no padding sequence is longer than an image may be."""
    from .packing import INDEX_DTYPE, _raster

    n_img = pack.num_images
    pad = int(pack.cu_seqlens[-1] - pack.cu_seqlens[n_img])
    chunks = [min(max_len, pad - a) for a in range(0, pad, max_len)]
    lens = pack.seqlens[:n_img].tolist() + chunks
    if len(lens) > sequences:
        raise ValueError(f"split_padding: {len(lens)} sequences do not fit in {sequences}")
    lens += [0] * (sequences - len(lens))
    cu = torch.zeros(sequences + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    grid = torch.cat([pack.grid[:n_img], torch.tensor([[1, c] for c in chunks] + [[0, 0]] * (sequences - n_img - len(chunks)),
                                                      dtype=INDEX_DTYPE).view(-1, 2)])
    image_tokens = int(pack.cu_seqlens[n_img])
    coords = torch.cat([pack.coords[:image_tokens]] + [_raster(1, c, pack.coords.device) for c in chunks])
    prefix = torch.tensor(lens, dtype=INDEX_DTYPE)  # padding: prefix = length
    if pack.prefix_len is not None:
        prefix[:n_img] = pack.prefix_len[:n_img]
    else:
        prefix[:n_img] = 0
    return PackedImages(patches=pack.patches, cu_seqlens=cu.to(INDEX_DTYPE), grid=grid, coords=coords,
                        prefix_len=prefix, patch_size=pack.patch_size, max_seqlen=max_len, num_images=n_img)


def first_fit_pack(pending: list, pull: Callable[[], object], length: Callable[[object], int], tokens: int,
                   max_images: int) -> Tuple[list, list, int]:
    """One pack's choice, the rule of ``NativePackStream`` (and of benchmarks/native_throughput.py, on lengths):
    the waiting items, then ``pull()``'s, in data order, each taken when its ``length`` fits in what is left
    of ``tokens``; stop when full, at ``max_images`` taken or after ``MAX_SKIPPED`` that did not fit.
    Returns (taken, the new waiting list in data order, tokens left)."""
    taken, skipped, left, i = [], [], tokens, 0
    while left > 0 and len(taken) < max_images and len(skipped) < MAX_SKIPPED:
        item = pending[i] if i < len(pending) else pull()
        i += 1
        if length(item) <= left:
            taken.append(item)
            left -= length(item)
        else:
            skipped.append(item)
    return taken, skipped + pending[i:], left


def counted_targets(pack: PackedImages, offset: int) -> int:
    """The loss targets of a CPU pack: for each image, #{j < n_i : j >= offset and j >= prefix_i}."""
    n = pack.seqlens[:pack.num_images].long()
    first = torch.full_like(n, offset)
    if pack.prefix_len is not None:
        first = torch.maximum(first, pack.prefix_len[:pack.num_images].long())
    return int((n - first).clamp_min(0).sum())
