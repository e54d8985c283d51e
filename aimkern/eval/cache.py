"""On-disk feature cache: memory-mapped ``.npy`` arrays, one entry per (model, data, layers, image size, dtype).

An entry is a directory ``CACHE/<key>/`` holding ``patches.npy`` (n, N, dim), ``pooled.npy`` (n, dim),
``labels.npy`` (n,) and ``meta.json``. It is written as ``<key>.tmp/`` (rank 0 creates the arrays, every rank
fills its rows through its own memory map) and renamed into place once complete, so a crashed or
interrupted extraction never leaves an entry that looks valid. Under torchrun CACHE must be on a filesystem
every rank sees (one machine, or a shared mount).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Tuple

import numpy as np

from ..distributed import DistEnv, barrier

VERSION = 1  # bump when the extraction itself changes, to orphan older entries


def key(**fields) -> str:
    """A short, stable digest of the fields that decide the features."""
    text = json.dumps({"version": VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def entry_dir(cache_dir: str, k: str) -> str:
    return os.path.join(cache_dir, k)


def read(cache_dir: str, k: str) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(patches, pooled, labels) of a complete entry, memory-mapped read-only, or None."""
    d = entry_dir(cache_dir, k)
    if not os.path.isfile(os.path.join(d, "meta.json")):
        return None
    return tuple(np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r") for name in ("patches", "pooled", "labels"))


def begin_write(cache_dir: str, k: str, shape: tuple, dtype: str, labels: np.ndarray, env: DistEnv):
    """Collective: rank 0 creates the entry's temporary arrays; then every rank opens them for writing.
    Returns this rank's (patches, pooled) memory maps."""
    tmp = entry_dir(cache_dir, k) + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        os.makedirs(tmp)
        np.lib.format.open_memmap(os.path.join(tmp, "patches.npy"), "w+", dtype, shape).flush()
        np.lib.format.open_memmap(os.path.join(tmp, "pooled.npy"), "w+", dtype, (shape[0], shape[2])).flush()
        np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))
    barrier(env)
    return (np.load(os.path.join(tmp, "patches.npy"), mmap_mode="r+"),
            np.load(os.path.join(tmp, "pooled.npy"), mmap_mode="r+"))


def end_write(cache_dir: str, k: str, env: DistEnv, meta: dict) -> None:
    """Collective: once every rank has written (and dropped) its memory maps, rank 0 completes the entry."""
    barrier(env)
    if not env.is_main:
        return
    tmp, final = entry_dir(cache_dir, k) + ".tmp", entry_dir(cache_dir, k)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.isdir(final):  # an incomplete entry (no meta.json) from an older layout or a crash
        shutil.rmtree(final)
    os.replace(tmp, final)
