"""Pretraining data at scale: WebDataset tar shards with a deterministic, exactly resumable order.

- ``shards``: where the shards are (a brace pattern, a directory of ``.tar`` files, a shard-list file or a
  wids JSON index) and how many samples each holds (what exact resume needs).
- ``pack``: ``python -m aimkern.data pack SRC DST`` (ImageFolder -> shards + index) and ``index``.
- ``order``: global sample position -> sample, shuffled within windows of shards, a pure function of the seed.
- ``decode``: PIL decode with JPEG draft mode (DCT-domain downscaling) + random-resized crop and flip.
- ``gpu_decode``: ``--decode gpu``, batched nvJPEG decode and crop / resize on the GPU.
- ``bad``: the skip-and-replace rule for samples that fail to decode, shareable by any reader.
- ``stream``: the training stream ``aimkern.train`` builds when ``--data`` names shards.

Only ``shards`` is imported here: ``aimkern.train.args`` uses it, and ``stream`` imports ``aimkern.train``.
"""
from .shards import INDEX_NAME, ShardList, is_shard_spec, resolve_shards

__all__ = ["INDEX_NAME", "ShardList", "is_shard_spec", "resolve_shards"]
