"""Samples that fail to decode: skip, replace deterministically, count, report, bound.

The rule, shareable by every reader (shards here; an ImageFolder reader can call ``load_or_replace`` around
its ``folder[index]`` the same way): a sample whose bytes do not decode is replaced by the sample at index
``replacement(seed, attempt, n)``, where ``seed`` is the failing position's own augmentation seed. The
batch keeps its size (so the loss's target count and the ranks' split are unchanged) and the replacement
is the same in every run, worker count and process: resume stays exact with bad samples in the data.
Each skip comes back as a message; ``BadSampleLog`` (in the training process) counts, prints and bounds them.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, List, Optional, Tuple, TypeVar

import numpy as np

T = TypeVar("T")
MAX_TRIES = 16  # replacements tried for one position before the data is declared unreadable


class BadSample(ValueError):
    """A sample that holds no usable image (e.g. no jpg / png / webp member)."""


def decode_errors() -> tuple:
    """Exceptions that mean "this sample's bytes are bad" (not "the program is broken")."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def replacement(seed: int, attempt: int, n: int) -> int:
    """The index tried after ``attempt`` failures at the position whose augmentation seed is ``seed``."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, attempt, 5]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] % np.uint64(n))


def load_or_replace(load: Callable[[int], T], index: int, *, n: int, seed: int, name: Callable[[int], str] = str,
                    tries: int = MAX_TRIES) -> Tuple[T, List[str]]:
    """``load(index)``, or the first replacement that decodes; with one message per skipped sample."""
    errors = decode_errors()
    skipped: List[str] = []
    candidate = index
    for attempt in range(tries):
        try:
            return load(candidate), skipped
        except errors as e:
            # PIL names the BytesIO object's address: drop it, so the messages are the same in every run
            reason = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(e))[:200]
            skipped.append(f"{name(candidate)}: {type(e).__name__}: {reason}")
        candidate = replacement(seed, attempt + 1, n)
    raise RuntimeError(f"{tries} samples in a row failed to decode (is the data readable?):\n  " + "\n  ".join(skipped))


class BadSampleLog:
    """Counts the skipped samples a stream reports, prints each one, and stops past ``limit`` (None: no bound)."""

    def __init__(self, limit: Optional[int] = None, prefix: str = "aimkern.data"):
        self.limit, self.prefix, self.count = limit, prefix, 0

    def record(self, skipped: List[str]) -> None:
        for message in skipped:
            self.count += 1
            print(f"{self.prefix}: skipped bad sample {message} (replaced by a seeded draw; {self.count} so far)",
                  file=sys.stderr, flush=True)
        if self.limit is not None and self.count > self.limit:
            raise RuntimeError(f"{self.count} bad samples, more than the allowed {self.limit}")
