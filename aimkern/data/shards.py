"""Where the shards are and how many samples each holds.

``--data`` names shards in one of four ways:
- a brace pattern, ``shards/train-{000000..000127}.tar`` (expanded with ``braceexpand``, webdataset's own);
- a directory holding ``.tar`` files (all of them, sorted by name);
- a shard-list file (``.txt``: one shard path per line, relative to the file) or a single ``.tar``;
- an index (``.json``): webdataset's ``wids`` dataset descriptor, ``{"wids_version": 1, "shardlist":
  [{"url": ..., "nsamples": ...}, ...]}``, read with wids' own resolver.

Exact resume needs each shard's sample count. An index gives them for free; for the other forms the
``index.json`` beside the shards is used when it lists them, and any shard it does not list is counted by
scanning its tar headers (wids' indexed reader), which ``python -m aimkern.data index`` does once instead.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

INDEX_NAME = "index.json"
SHARD_SUFFIX = ".tar"
LIST_SUFFIXES = (".txt", ".shards")


@dataclass(frozen=True)
class ShardList:
    """Shards (absolute local paths) and their sample counts, in a fixed order: global sample index i is
    sample ``i - start[k]`` of the shard k with ``start[k] <= i < start[k] + counts[k]``."""

    paths: Tuple[str, ...]
    counts: Tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def starts(self) -> List[int]:
        out, acc = [], 0
        for c in self.counts:
            out.append(acc)
            acc += c
        return out


def _is_brace(spec: str) -> bool:
    return "{" in spec and ".." in spec and "}" in spec


def is_shard_spec(data: str) -> bool:
    """Whether ``--data`` names shards (checked cheaply: an existing directory of ``.tar`` files, an existing
    list / index / ``.tar`` file, or a brace pattern whose first shard exists)."""
    if _is_brace(data):
        from braceexpand import braceexpand

        first = next(iter(braceexpand(data)), None)
        return first is not None and os.path.isfile(first)
    if os.path.isdir(data):
        return any(name.endswith(SHARD_SUFFIX) for name in os.listdir(data))
    return os.path.isfile(data) and data.endswith((".json", SHARD_SUFFIX) + LIST_SUFFIXES)


def expand(spec: str) -> Tuple[List[str], Optional[Dict[str, int]]]:
    """The shard paths ``spec`` names, and their counts when ``spec`` is an index (else None)."""
    if _is_brace(spec):
        from braceexpand import braceexpand

        paths = [os.path.abspath(p) for p in braceexpand(spec)]
    elif os.path.isdir(spec):
        paths = sorted(os.path.join(os.path.abspath(spec), n) for n in os.listdir(spec) if n.endswith(SHARD_SUFFIX))
    elif spec.endswith(".json"):
        return _read_index(spec)
    elif spec.endswith(LIST_SUFFIXES):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        paths = [os.path.normpath(os.path.join(base, ln)) for ln in lines]
    elif spec.endswith(SHARD_SUFFIX):
        paths = [os.path.abspath(spec)]
    else:
        raise ValueError(f"not a shard pattern, directory, list or index: {spec!r}")
    return paths, None


def _read_index(path: str) -> Tuple[List[str], Dict[str, int]]:
    """A wids descriptor through wids' resolver (relative urls are resolved against the index's folder)."""
    from wids.wids_specs import load_dsdesc_and_resolve

    desc = load_dsdesc_and_resolve(os.path.abspath(path), base=os.path.dirname(os.path.abspath(path)))
    paths, counts = [], {}
    for shard in desc["shardlist"]:
        p = os.path.abspath(shard["url"])
        paths.append(p)
        counts[p] = int(shard["nsamples"])
    return paths, counts


def count_samples(path: str) -> int:
    """Samples in one shard: wids' indexed reader groups the tar's members by key (one pass over headers)."""
    from wids.wids import IndexedTarSamples

    tar = IndexedTarSamples(path=path)
    try:
        return len(tar)
    finally:
        tar.close()


def resolve_shards(spec: str) -> ShardList:
    """``spec`` -> ShardList; raises FileNotFoundError naming the missing shards."""
    paths, counts = expand(spec)
    if not paths:
        raise FileNotFoundError(f"--data {spec!r} names no shards")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards of {spec!r} are missing, e.g. {missing[0]}")
    if counts is None:
        counts = _sibling_index_counts(paths)
        unlisted = [p for p in paths if p not in counts]
        if unlisted:
            print(f"aimkern.data: counting the samples of {len(unlisted)} shard(s) without an index; "
                  f"`python -m aimkern.data index {spec}` does it once", file=sys.stderr)
            counts.update({p: count_samples(p) for p in unlisted})
    shards = ShardList(tuple(paths), tuple(counts[p] for p in paths))
    if shards.total < 1:
        raise ValueError(f"--data {spec!r}: the shards hold no samples")
    return shards


def _sibling_index_counts(paths: Sequence[str]) -> Dict[str, int]:
    """Counts from ``index.json`` in the shards' folder(s), for the shards it lists."""
    counts: Dict[str, int] = {}
    for folder in sorted({os.path.dirname(p) for p in paths}):
        index = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index):
            counts.update(_read_index(index)[1])
    return counts


def write_index(path: str, paths: Iterable[str], counts: Iterable[int], *, name: str, extra: Optional[dict] = None):
    """Write a wids descriptor (urls relative to the index's folder, so the set can be moved as a whole)."""
    base = os.path.dirname(os.path.abspath(path))
    shardlist = [
        {"url": os.path.relpath(os.path.abspath(p), base), "nsamples": int(n), "filesize": os.path.getsize(p)}
        for p, n in zip(paths, counts)
    ]
    desc = {"wids_version": 1, "name": name, **(extra or {}), "shardlist": shardlist}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(desc, f, indent=1)
    os.replace(tmp, path)
    return path
