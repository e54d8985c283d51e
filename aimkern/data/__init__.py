"""Training data: deterministic, exactly resumable batch streams (digits, ImageFolder, WebDataset shards).

- ``seeds``: ``mix_seed``, the one seed-mixing rule, and the tag of each seeded draw.
- ``sampling``: global sample position -> dataset index and seed (``SampleOrder``, ``PositionBatches``).
- ``sources``: ``make_stream`` (``--data`` -> stream) and the ``BatchStream`` protocol every stream follows.
- ``memory``, ``folder``, ``shard_stream``: the digits / synthetic, ImageFolder and WebDataset shard streams.
- ``bad``: the one rule for samples that fail to decode (a seeded replacement) and its ``BadRecord``.
- ``digits``: scikit-learn's bundled digits.
- ``shards``: where the shards are (a brace pattern, a directory of ``.tar`` files, a shard-list file or a
  wids JSON index) and how many samples each holds; ``order``: the shard-aware sample order.
- ``pack``: ``python -m aimkern.data pack SRC DST`` (ImageFolder -> shards + index) and ``index``.
- ``decode``: the one CPU decoder (header -> crop box -> DCT-scaled libjpeg-turbo decode (``jpeg``) -> uint8
  crop / resize / flip (``resize``); PIL for the rest); ``gpu_decode``: ``--decode gpu`` with nvJPEG.
- ``collate``: uint8 batches stacked into a worker's shared memory; ``inputs``: ``model_input``, the
  normalization of a uint8 batch on the device, inside the training step.

Nothing here imports ``aimkern.train``. Only ``shards`` is imported eagerly (``aimkern.train.args`` uses it,
and must not pay for torch before ``--help``); the other public names load on first use.
"""
from __future__ import annotations

import importlib

from .shards import INDEX_NAME, ShardList, is_shard_spec, resolve_shards

_LAZY = {
    "BadRecord": ".bad", "load_or_replace": ".bad", "BatchStream": ".sources", "make_stream": ".sources",
    "FolderStream": ".folder", "InMemoryStream": ".memory", "ShardStream": ".shard_stream",
    "PositionBatches": ".sampling", "SampleOrder": ".sampling", "rank_positions": ".sampling", "mix_seed": ".seeds",
    "digits_split": ".digits", "ShardWindowOrder": ".order",
}

__all__ = ["INDEX_NAME", "ShardList", "is_shard_spec", "resolve_shards", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'aimkern.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
