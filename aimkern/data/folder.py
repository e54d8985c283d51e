"""The training stream over a torchvision ``ImageFolder`` tree (``--data DIR``).

torchvision's ImageFolder only lists the files; DataLoader workers read each file's bytes and decode them
with the shard reader's decoder (``aimkern.data.decode``: libjpeg-turbo at a DCT scale, the seeded
random-resized crop and flip in uint8), each sample with its own seed (``sampling.PositionBatches``): a batch
is a pure function of (seed, positions), whatever the worker count. A file that fails to decode is replaced
by the seeded draw of ``aimkern.data.bad`` (the shard stream's rule) and reported as a ``BadRecord``.
"""
from __future__ import annotations

import re
from typing import Iterator, List

import torch

from .bad import BadRecord, decode_errors, load_or_replace
from .collate import collate_images
from .decode import augmentation, check_channels, decode_crop, pil_pixels
from .resize import crop_resize
from .sampling import PositionBatches, SampleOrder


class SeededCrop:
    """The ImageFolder reader's transform: the shard reader's seeded crop + flip, as uint8 (C, S, S).

    ``decode(data, seed)`` decodes encoded bytes (what ``SeededImages`` calls: no PIL decode for JPEGs);
    called on a PIL image (ImageFolder's own ``folder[i]``) it crops that image with a seed drawn from
    torch's global RNG, as torchvision's random transforms do."""

    def __init__(self, img_size: int, in_chans: int):
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        check_channels(in_chans)
        self.img_size, self.in_chans = img_size, in_chans

    def decode(self, data: bytes, seed: int) -> torch.Tensor:
        return decode_crop(data, self.img_size, self.in_chans, seed)

    def __call__(self, image) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, ()).item())
        pixels, box, flip = pil_pixels(image, lambda w, h: augmentation(w, h, seed), self.in_chans)
        return crop_resize(pixels, box, self.img_size, flip)


def image_folder_transform(img_size: int, in_chans: int) -> SeededCrop:
    """The ImageFolder transform of ``aimkern.train``: random-resized crop (scale 0.4 .. 1, bicubic) + flip, in
    uint8 (the step normalizes with ImageNet's statistics on the device)."""
    if in_chans not in (1, 3):
        raise ValueError(f"--data DIR: images are read as RGB or grayscale, but the preset has in_chans={in_chans}")
    return SeededCrop(img_size, in_chans)


def _naming(error: BaseException, path: str) -> BaseException:
    """``error`` with the file's path where PIL's message names the in-memory buffer it read (PIL opened the
    path itself before, and the bad-sample record says which file to fix)."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", repr(path), str(error))
    if text == str(error):
        return error
    try:
        return type(error)(text)
    except TypeError:  # an exception class that wants other arguments: keep the original
        return error


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SeededImages(torch.utils.data.Dataset):
    """An ImageFolder indexed by (index, seed): ``[(index, seed)]`` -> (image, records of the skipped files).
    The augmentation draws from ``seed`` alone; a file that does not decode is replaced by a seeded draw.

    With a ``SeededCrop`` transform the file's bytes go straight to the decoder; any other transform is
    applied to ImageFolder's PIL image with torch's RNG seeded from ``seed``."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def _load(self, index: int, seed: int) -> torch.Tensor:
        transform = self.folder.transform
        if isinstance(transform, SeededCrop):
            path = self.folder.samples[index][0]
            try:
                return transform.decode(read_file(path), seed)
            except decode_errors() as e:
                named = _naming(e, path)
                if named is e:
                    raise
                raise named from e
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global RNG
            torch.manual_seed(seed)
            return self.folder[index][0]

    def __getitem__(self, key):
        index, seed = key
        return load_or_replace(lambda i: self._load(i, seed), index, n=len(self.folder), seed=seed,
                               name=lambda i: self.folder.samples[i][0])


def collate(items):
    """Stack the uint8 images (into shared memory in a worker); concatenate the records."""
    return collate_images(items)


class FolderStream:
    """Infinite (global_batch // world, C, S, S) uint8 batches on ``device`` from an ImageFolder tree, starting
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
            # uint8, pinned on CUDA: an asynchronous copy; the step normalizes on the device (model_input).
            yield images.to(self.device, non_blocking=True)

    def take_bad(self) -> List[BadRecord]:
        bad, self._bad = self._bad, []
        return bad
