"""Training data as a deterministic, resumable stream of batches.

Every source maps a global sample position p (0, 1, 2, ... over the whole run) to a dataset index through
a seeded permutation per epoch, so the stream is a pure function of (seed, position): resuming at the saved
position gives exactly the batches an uninterrupted run would have seen, and under torchrun rank r of W
takes rows [r * B / W, (r + 1) * B / W) of each global batch of B.

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (no download), the train split of ``digits_split``,
  kept at 8x8 on the device and upsampled per batch to the preset's size and channels.
- ``synthetic``: a fixed pool of random images on the device (pure throughput, no input pipeline).
- a directory: a torchvision ``ImageFolder`` read by DataLoader workers with random-resized-crop and flip
  augmentation; each sample's augmentation is seeded by its position, so it is reproducible too. A file
  that cannot be read is replaced by the next readable one and reported (``take_bad``; see bad_samples.py).
- WebDataset shards (a brace pattern, a directory of ``.tar`` files, a shard-list or index file):
  ``aimkern.data.stream.ShardStream``, the same guarantees through the same sampler.

Every stream has ``take_bad()`` (the (path, error) failures since the last call) and ``num_files`` (the
dataset size the --max-bad-samples fraction refers to; None for the in-memory sources).
"""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_TEST_FRACTION = 0.25
SYNTHETIC_POOL = 512  # random images kept on the device for --data synthetic


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (stable across processes and runs)."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in values]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------------
# digits
def digits_split() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (x_train (n, 1, 8, 8) in [0, 1], y_train (n,), x_test, y_test), a fixed
    stratified split (75 / 25). Pretraining uses only x_train; the probe fits on train and scores on test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


# Mean and std of the 8x8 digits in [0, 1] (the whole set), to standardize the inputs.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3761


def digits_to_images(x8: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """(B, 1, 8, 8) digits in [0, 1] -> (B, in_chans, img_size, img_size), bilinearly upsampled and standardized."""
    x = F.interpolate(x8, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    return x.expand(-1, in_chans, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------------------
# the position -> index order shared by every source
class SampleOrder:
    """Global sample position -> dataset index: a fresh seeded permutation of the n samples each epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.seed = n, seed
        self._perms: dict = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # positions only move forward: drop old epochs
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        epochs, within = positions // self.n, positions % self.n
        out = torch.empty_like(positions)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out


def rank_positions(start: int, step: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """The global sample positions rank ``rank`` reads at ``step`` steps after position ``start``."""
    local = global_batch // world
    first = start + step * global_batch + rank * local
    return torch.arange(first, first + local, dtype=torch.int64)


class InMemoryStream:
    """Infinite local batches gathered from a tensor on the device, then ``transform``ed (e.g. upsampled)."""

    def __init__(self, base: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], *, global_batch: int,
                 rank: int, world: int, seed: int, start: int):
        self.base, self.transform = base, transform
        self.global_batch, self.rank, self.world, self.start = global_batch, rank, world, start
        self.order = SampleOrder(base.shape[0], seed)

    num_files = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while True:
            idx = self.order.indices(rank_positions(self.start, step, self.global_batch, self.rank, self.world))
            yield self.transform(self.base.index_select(0, idx.to(self.base.device)))
            step += 1

    def take_bad(self) -> list:
        return []  # in-memory data is always readable


# ------------------------------------------------------------------------------------------------------
# ImageFolder
class _SeededImages(torch.utils.data.Dataset):
    """An ImageFolder indexed by (index, seed): the augmentation of each sample draws from its own seed.

    Returns (image, failures): a file that cannot be read or decoded is replaced by the next readable one
    (index + 1, + 2, ... with the same seed: deterministic, so resume stays exact), and failures lists the
    (path, error) of each file skipped on the way."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key
        failures = []
        for k in range(len(self.folder)):
            i = (index + k) % len(self.folder)
            try:
                with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global RNG
                    torch.manual_seed(seed)
                    return self.folder[i][0], failures
            except Exception as e:  # PIL's UnidentifiedImageError, OSError on truncated files, ...
                failures.append((self.folder.samples[i][0], f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        raise RuntimeError(f"--data: none of the {len(self.folder)} images can be read (e.g. {failures[0]})")


def _collate(items):
    """Stack the images; concatenate the failures."""
    return torch.stack([image for image, _ in items]), [f for _, failures in items for f in failures]


class _PositionBatches(torch.utils.data.Sampler):
    """Infinite batch sampler: the (index, seed) pairs of this rank's rows of each global batch."""

    def __init__(self, order: SampleOrder, *, global_batch: int, rank: int, world: int, seed: int, start: int):
        self.order, self.seed = order, seed
        self.global_batch, self.rank, self.world, self.start = global_batch, rank, world, start

    def __iter__(self):
        step = 0
        while True:
            pos = rank_positions(self.start, step, self.global_batch, self.rank, self.world)
            idx = self.order.indices(pos)
            yield [(i, mix_seed(self.seed, p, 1)) for i, p in zip(idx.tolist(), pos.tolist())]
            step += 1


def image_folder_transform(img_size: int, in_chans: int):
    from torchvision import transforms as T

    from ..data.decode import MEAN_STD  # ImageNet statistics, shared with the shard stream and the probes

    if in_chans not in MEAN_STD:
        raise ValueError(f"--data DIR: images are read as RGB or grayscale, but the preset has in_chans={in_chans}")
    mean, std = MEAN_STD[in_chans]
    return T.Compose([
        T.Grayscale(1) if in_chans == 1 else T.Lambda(lambda im: im.convert("RGB")),
        T.RandomResizedCrop(img_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class FolderStream:
    def __init__(self, root: str, img_size: int, in_chans: int, *, global_batch: int, rank: int, world: int,
                 seed: int, start: int, workers: int, device: torch.device):
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(root, transform=image_folder_transform(img_size, in_chans))
        sampler = _PositionBatches(SampleOrder(len(folder), seed), global_batch=global_batch, rank=rank,
                                   world=world, seed=seed, start=start)
        self.device, self.num_files, self._bad = device, len(folder), []
        self.loader = torch.utils.data.DataLoader(
            _SeededImages(folder), batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        for images, failures in self.loader:
            self._bad.extend(failures)
            yield images.to(self.device, non_blocking=True)

    def take_bad(self) -> list:
        bad, self._bad = self._bad, []
        return bad


# ------------------------------------------------------------------------------------------------------
def make_stream(data: str, *, img_size: int, in_chans: int, global_batch: int, rank: int, world: int, seed: int,
                start: int, device: torch.device, workers: int = 0, decode: str = "cpu"):
    """The training stream for ``--data``: an iterable of (global_batch // world, C, H, W) float32 batches on
    ``device``, beginning at global sample position ``start``. ``decode`` ('cpu' or 'gpu') applies to shards."""
    common = dict(global_batch=global_batch, rank=rank, world=world, seed=seed, start=start)
    if data == "digits":
        x_train = digits_split()[0].to(device)
        return InMemoryStream(x_train, lambda x: digits_to_images(x, img_size, in_chans), **common)
    if data == "synthetic":
        gen = torch.Generator().manual_seed(mix_seed(seed, 2))
        pool = torch.randn(SYNTHETIC_POOL, in_chans, img_size, img_size, generator=gen).to(device)
        return InMemoryStream(pool, lambda x: x, **common)
    from ..data.shards import is_shard_spec

    if is_shard_spec(data):
        from ..data.stream import ShardStream

        return ShardStream(data, img_size, in_chans, workers=workers, device=device, decode=decode, **common)
    if decode != "cpu":
        raise ValueError(f"--decode {decode} reads WebDataset shards only, and --data {data!r} is an ImageFolder")
    return FolderStream(data, img_size, in_chans, workers=workers, device=device, **common)
