"""The training stream over WebDataset shards, the counterpart of ``aimkern.data.folder.FolderStream``.

Same guarantees as the ImageFolder stream, through the same machinery: ``PositionBatches`` turns the
global positions of this rank's rows of each global batch into (index, seed) keys, a ``ShardWindowOrder``
maps positions to samples, and DataLoader workers fetch and decode each key with wids' indexed tar reader.
Every batch is a pure function of (seed, positions): the worker count never changes it, ranks read disjoint
rows, and resume restarts at the checkpoint's position.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Iterator, List, Tuple

import numpy as np
import torch

from .bad import BadRecord, BadSample, load_or_replace
from . import jpeg
from .collate import stack_images
from .decode import augmentation, check_channels, decode_crop, open_image, pil_mode
from .order import WINDOW_SHARDS, ShardWindowOrder
from .sampling import PositionBatches
from .shards import ShardList, resolve_shards

IMAGE_KEYS = (".jpg", ".jpeg", ".png", ".webp")
_OPEN_SHARDS = 2 * WINDOW_SHARDS  # per process: a window of shards plus the next one's first


class ShardImages(torch.utils.data.Dataset):
    """Samples of a ShardList by global index. ``[(index, seed)]`` -> (uint8 (C, S, S), BadRecords of the
    skipped samples), or with ``gpu=True`` -> (GpuItem, BadRecords): bytes and crop only, decoded later on the GPU.

    Open shards (mmapped by wids) live in a per-process LRU that is not pickled, so each worker opens its own.
    """

    def __init__(self, shards: ShardList, img_size: int, in_chans: int, *, draft: bool = True, gpu: bool = False):
        check_channels(in_chans)
        self.shards, self.img_size, self.in_chans, self.draft, self.gpu = shards, img_size, in_chans, draft, gpu
        self.starts = torch.tensor(shards.starts(), dtype=torch.int64)
        self._starts = [int(v) for v in shards.starts()]
        self._open: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return self.shards.total

    def __getstate__(self):
        return dict(self.__dict__, _open=OrderedDict())

    def locate(self, index: int) -> Tuple[int, int]:
        """Global index -> (shard number, sample within the shard)."""
        k = bisect.bisect_right(self._starts, index) - 1  # plain ints: two torch calls cost more per sample
        return k, index - self._starts[k]

    def _tar(self, k: int):
        from wids.wids import IndexedTarSamples

        if k not in self._open:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
            self._open[k] = IndexedTarSamples(path=self.shards.paths[k])
        self._open.move_to_end(k)
        return self._open[k]

    def name(self, index: int) -> str:
        k, i = self.locate(index)
        return f"{self.shards.paths[k]}[{i}]"

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index`` (its jpg, jpeg, png or webp member, the first present)."""
        k, i = self.locate(index)
        sample = self._tar(k)[i]
        for key in IMAGE_KEYS:
            if key in sample:
                return sample[key].getvalue()
        raise BadSample(f"no {'/'.join(k[1:] for k in IMAGE_KEYS)} member in sample {sample.get('__key__')!r}")

    def _load_cpu(self, index: int, seed: int) -> torch.Tensor:
        return decode_crop(self.image_bytes(index), self.img_size, self.in_chans, seed, self.draft)

    def _load_gpu(self, index: int, seed: int, key):
        from .gpu_decode import GpuItem

        data = self.image_bytes(index)
        if jpeg.is_jpeg(data):
            try:
                size = jpeg.jpeg_size(data)  # a broken header is left to PIL below, and skipped on the CPU
            except ValueError:
                size = None
            if size is not None:
                box, flip = augmentation(*size, seed)
                return GpuItem(torch.frombuffer(bytearray(data), dtype=torch.uint8), None, box, flip, key)
        im = open_image(data)
        box, flip = augmentation(*im.size, seed)
        pixels = torch.from_numpy(np.asarray(im.convert(pil_mode(self.in_chans))).copy())
        pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
        return GpuItem(None, pixels.permute(2, 0, 1).contiguous(), box, flip, key)

    def __getitem__(self, key):
        index, seed = key
        load = (lambda i: self._load_gpu(i, seed, key)) if self.gpu else (lambda i: self._load_cpu(i, seed))
        return load_or_replace(load, index, n=len(self), seed=seed, name=self.name)

    def replace_on_cpu(self, key) -> Tuple[torch.Tensor, List[BadRecord]]:
        """A sample the GPU decoder refused: a CPU decode of it, or of its seeded replacement."""
        index, seed = key
        return load_or_replace(lambda i: self._load_cpu(i, seed), index, n=len(self), seed=seed, name=self.name)


def collate(items):
    """[(image or GpuItem, records)] -> (uint8 (B, C, S, S) or [GpuItem], all records)."""
    images, skipped = zip(*items)
    records = [r for rs in skipped for r in rs]
    if isinstance(images[0], torch.Tensor):
        return stack_images(images), records
    return list(images), records


class ShardStream:
    """Infinite (global_batch // world, C, S, S) uint8 batches on ``device`` from WebDataset shards,
    starting at global sample position ``start``; a ``BatchStream`` (``aimkern.data.sources``) with the
    arguments of ``FolderStream``, plus:

    Args:
        decode: 'cpu' (libjpeg-turbo at a DCT scale, ``aimkern.data.decode``) or 'gpu' (nvJPEG; refused
            without CUDA). Either way the batch is uint8; the training step normalizes it.
        draft: DCT-scaled JPEG decode on the CPU path (the benchmark turns it off to compare).
    """

    def __init__(self, data: str, img_size: int, in_chans: int, *, global_batch: int, rank: int, world: int,
                 seed: int, start: int, workers: int, device: torch.device, decode: str = "cpu",
                 draft: bool = True, window: int = WINDOW_SHARDS):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
        if decode == "gpu":
            from .gpu_decode import gpu_decode_problem

            problem = gpu_decode_problem(device)
            if problem:
                raise RuntimeError(problem)
        shards = data if isinstance(data, ShardList) else resolve_shards(data)
        self.device, self.img_size, self.in_chans, self.gpu = torch.device(device), img_size, in_chans, decode == "gpu"
        self.dataset = ShardImages(shards, img_size, in_chans, draft=draft, gpu=self.gpu)
        sampler = PositionBatches(ShardWindowOrder(shards.counts, seed, window), global_batch=global_batch,
                                   rank=rank, world=world, seed=seed, start=start)
        self.num_samples = sum(shards.counts)  # what a --max-bad-samples fraction refers to
        self._pending: List[BadRecord] = []  # since the last take_bad()
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda" and not self.gpu, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def take_bad(self) -> List[BadRecord]:
        """The samples that failed to decode since the last call (each replaced by a seeded draw); the caller
        counts, reports and bounds them (the trainer: --max-bad-samples, over all ranks)."""
        bad, self._pending = self._pending, []
        return bad

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch, skipped in self.loader:
            if self.gpu:
                from .gpu_decode import decode_batch

                items = batch
                batch, more = decode_batch(items, self.img_size, self.in_chans, self.device,
                                           lambda i: self.dataset.replace_on_cpu(items[i].key))
                skipped = skipped + more
            self._pending.extend(skipped)
            # uint8 to the device (pinned on CUDA: an asynchronous copy); model_input normalizes it there.
            yield batch.to(self.device, non_blocking=True)
