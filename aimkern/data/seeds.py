"""The one seed-mixing rule of aimkern: a tuple of ints -> a well-mixed 63-bit seed.

Every seeded draw of the data pipeline and the trainer (epoch permutations, shard windows, per-sample
augmentation, bad-sample replacements, AIM's prefixes, per-rank RNG streams) derives its seed here, with a
distinct trailing tag per use, so the draws never collide and a run is a pure function of its ``--seed``.
"""
from __future__ import annotations

import numpy as np

# The trailing tag of each use (the last value passed to mix_seed): one table, so no two uses share one.
# SampleOrder's permutation mixes (seed, epoch) with no tag: kept as it was, so older runs resume exactly.
TAG_SAMPLE = 1         # (seed, position, 1): a sample's augmentation seed
TAG_SYNTHETIC = 2      # (seed, 2): the synthetic pool
TAG_RANK = 3           # (seed, rank, 3): each rank's torch stream after initialization
TAG_PREFIX = 4         # (seed, step, 4): AIM's prefixes of a step
TAG_REPLACEMENT = 5    # (sample seed, attempt, 5): the replacement of a bad sample
TAG_SHARD_ORDER = 10   # (seed, epoch, 10): the shard permutation of an epoch
TAG_WINDOW = 11        # (seed, epoch, window, 11): the sample permutation within a window of shards
TAG_NATIVE_PREFIX = 12 # (seed, step, rank, 12): the per-image prefixes of a rank's native pack


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (stable across processes, platforms and runs)."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in values]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
