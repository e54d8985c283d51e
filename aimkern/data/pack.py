"""``pack``: an ImageFolder tree -> WebDataset shards + index; ``index``: the index of existing shards.

Packing copies each file's encoded bytes (no re-encode; formats other than jpg / png / webp are re-encoded
as png) into ``DST/PREFIX-000000.tar, ...`` through webdataset's ``ShardWriter``, ``--shard-size`` samples
per shard, in a seeded random order: the reader shuffles within windows of shards, so shards must not be
sorted by class. Each sample is ``{__key__: 9-digit number, jpg|png|webp: bytes, cls: class index}``.
``DST/index.json`` (a wids descriptor) lists the shards with their sample counts and the class names.
"""
from __future__ import annotations

import io
import os
import random
from typing import List, Optional, Sequence

from .shards import INDEX_NAME, count_samples, expand, write_index

KEEP_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _encoded(path: str):
    """(extension, bytes): the file itself when it is jpg / png / webp, else a png re-encode."""
    ext = KEEP_AS_IS.get(os.path.splitext(path)[1].lower())
    if ext is not None:
        with open(path, "rb") as f:
            return ext, f.read()
    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return "png", buf.getvalue()


def pack(src: str, dst: str, shard_size: int, *, prefix: str = "train", seed: int = 0, progress: bool = True) -> str:
    """Write the ImageFolder ``src`` as shards of ``shard_size`` samples in ``dst``; returns the index path."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    from tqdm.auto import tqdm
    from webdataset import ShardWriter

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    classes, class_to_idx = find_classes(src)
    samples = make_dataset(src, class_to_idx, extensions=IMG_EXTENSIONS)
    random.Random(seed).shuffle(samples)
    os.makedirs(dst, exist_ok=True)
    paths: List[str] = []
    counts: List[int] = []
    with ShardWriter(os.path.join(dst, f"{prefix}-%06d.tar"), maxcount=shard_size, maxsize=float("inf"),
                     verbose=0) as sink:
        for i, (path, cls) in enumerate(tqdm(samples, desc="pack", unit="img", disable=None if progress else True)):
            ext, data = _encoded(path)
            sink.write({"__key__": f"{i:09d}", ext: data, "cls": cls})
            if sink.fname != (paths[-1] if paths else None):
                paths.append(sink.fname)
                counts.append(0)
            counts[-1] += 1
    return write_index(os.path.join(dst, INDEX_NAME), paths, counts, name=prefix, extra={"classes": classes})


def index(spec: str, out: Optional[str] = None, *, progress: bool = True) -> str:
    """Count the samples of the shards ``spec`` names (pattern, directory or list) and write their index
    (default: ``index.json`` in the first shard's folder)."""
    from tqdm.auto import tqdm

    paths: Sequence[str] = expand(spec)[0]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(f"{spec!r}: {len(missing)} of {len(paths)} shards missing" + (
            f", e.g. {missing[0]}" if missing else ""))
    counts = [count_samples(p) for p in tqdm(paths, desc="index", unit="shard", disable=None if progress else True)]
    out = out or os.path.join(os.path.dirname(paths[0]), INDEX_NAME)
    return write_index(out, paths, counts, name=os.path.basename(os.path.dirname(paths[0])) or "shards")
