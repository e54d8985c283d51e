"""Samples that fail to decode: one rule and one record for every source (ImageFolder, shards, in-memory).

The rule: a sample whose bytes do not decode is replaced by the sample at index
``replacement(seed, attempt, n)``, where ``seed`` is the failing position's own augmentation seed. The batch
keeps its size (so the loss's target count and the ranks' split are unchanged) and the replacement is the
same in every run, worker count and process: ``--resume`` stays exact with bad samples in the data.

Only the errors a decoder raises count as a bad sample (``decode_errors``); anything else (a TypeError, an
AttributeError: a programming error) propagates and crashes the run loudly. Each skip is a ``BadRecord``
(sample, error class, message), the one format that streams hand to the trainer (``take_bad()``) and that the
trainer prints on stderr and writes to metrics.jsonl and summary.json.
"""
from __future__ import annotations

import re
from typing import Callable, List, NamedTuple, Tuple, TypeVar

from .seeds import TAG_REPLACEMENT, mix_seed

T = TypeVar("T")
MAX_TRIES = 16  # replacements tried for one position before the data is declared unreadable


class BadSample(ValueError):
    """A sample that holds no usable image (e.g. no jpg / png / webp member)."""


class BadRecord(NamedTuple):
    """One sample that failed to decode: its path or shard key, the exception's class name, its message."""

    sample: str
    error: str
    message: str

    def __str__(self) -> str:
        return f"{self.sample}: {self.error}: {self.message}"

    def to_json(self) -> dict:
        return self._asdict()


def decode_errors() -> tuple:
    """Exceptions that mean "this sample's bytes are bad" (not "the program is broken")."""
    from PIL import Image

    # PIL's UnidentifiedImageError and truncated files are OSErrors; a bad header or mode is a ValueError or
    # SyntaxError; a cut stream an EOFError.
    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def replacement(seed: int, attempt: int, n: int) -> int:
    """The index tried after ``attempt`` failures at the position whose augmentation seed is ``seed``."""
    return mix_seed(seed, attempt, TAG_REPLACEMENT) % n


def record_of(sample: str, error: BaseException) -> BadRecord:
    """The record of ``error`` raised decoding ``sample``; the same in every run (PIL names the BytesIO's
    address in some messages: dropped), one line, at most 200 characters."""
    text = str(error).splitlines()[0] if str(error) else ""
    return BadRecord(sample, type(error).__name__, re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", text)[:200])


def load_or_replace(load: Callable[[int], T], index: int, *, n: int, seed: int, name: Callable[[int], str] = str,
                    tries: int = MAX_TRIES) -> Tuple[T, List[BadRecord]]:
    """``load(index)``, or the first seeded replacement that decodes; with one record per skipped sample."""
    errors = decode_errors()
    skipped: List[BadRecord] = []
    candidate = index
    for attempt in range(tries):
        try:
            return load(candidate), skipped
        except errors as e:
            skipped.append(record_of(name(candidate), e))
        candidate = replacement(seed, attempt + 1, n)
    raise RuntimeError(f"{tries} samples in a row failed to decode (is the data readable?):\n  "
                       + "\n  ".join(map(str, skipped)))


def describe(record: BadRecord, where: str = "") -> str:
    """The one line that reports a skipped sample (``where``: e.g. ' at step 12')."""
    return f"skipped bad sample {record.sample}{where}: {record.error}: {record.message} (replaced by a seeded draw)"

