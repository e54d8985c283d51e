"""The training stream over a torchvision ``ImageFolder`` tree (``--data DIR``).

DataLoader workers read and augment each sample with its own seed (``sampling.PositionBatches``): a batch is
a pure function of (seed, positions), whatever the worker count. A file that fails to decode is replaced by
the seeded draw of ``aimkern.data.bad`` (the shard stream's rule) and reported as a ``BadRecord``.
"""
from __future__ import annotations

from typing import Iterator, List

import torch

from .bad import BadRecord, load_or_replace
from .decode import MEAN_STD
from .sampling import PositionBatches, SampleOrder


def image_folder_transform(img_size: int, in_chans: int):
    """torchvision's random-resized crop (scale 0.4 .. 1, bicubic) + flip + ImageNet normalization."""
    from torchvision import transforms as T

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


class SeededImages(torch.utils.data.Dataset):
    """An ImageFolder indexed by (index, seed): ``[(index, seed)]`` -> (image, records of the skipped files).
    The augmentation draws from ``seed`` alone; a file that does not decode is replaced by a seeded draw."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def _load(self, index: int, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global RNG
            torch.manual_seed(seed)
            return self.folder[index][0]

    def __getitem__(self, key):
        index, seed = key
        return load_or_replace(lambda i: self._load(i, seed), index, n=len(self.folder), seed=seed,
                               name=lambda i: self.folder.samples[i][0])


def collate(items):
    """Stack the images; concatenate the records."""
    return torch.stack([image for image, _ in items]), [r for _, records in items for r in records]


class FolderStream:
    """Infinite (global_batch // world, C, S, S) float32 batches on ``device`` from an ImageFolder tree, starting
    at global sample position ``start``. A ``BatchStream`` (see ``aimkern.data.sources``)."""

    def __init__(self, root: str, img_size: int, in_chans: int, *, global_batch: int, rank: int, world: int,
                 seed: int, start: int, workers: int, device: torch.device):
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(root, transform=image_folder_transform(img_size, in_chans))
        sampler = PositionBatches(SampleOrder(len(folder), seed), global_batch=global_batch, rank=rank,
                                  world=world, seed=seed, start=start)
        self.device, self.num_samples, self._bad = device, len(folder), []
        self.loader = torch.utils.data.DataLoader(
            SeededImages(folder), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        for images, records in self.loader:
            self._bad.extend(records)
            yield images.to(self.device, non_blocking=True)

    def take_bad(self) -> List[BadRecord]:
        bad, self._bad = self._bad, []
        return bad
