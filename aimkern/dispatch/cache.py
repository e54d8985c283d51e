"""The decisions file: ``$AIMKERN_CACHE_DIR/dispatch.json``, shared by every process on the machine.

Format (one JSON object)::

    {"format": "aimkern-dispatch", "version": 1,
     "entries": {KEY: {"chosen": NAME, "candidates": {NAME: {"ms": .., "verified": .., "reason": ..}},
                       "names": [every candidate considered], "decided_at": "2026-12-01T12:00:00Z",
                       "configs": [the autotuned configs the decision fixed, ``picks``; absent in older files]}}}

Writes hold an exclusive ``flock`` on ``dispatch.json.lock``, re-read the file, merge the new entry into
what is there and replace the file atomically (a temporary file in the same folder, fsync, rename): two
processes deciding at once both keep their entries, and a reader never sees half a file. A file that is
not valid JSON, or not in this format, is reported once (one warning naming it and why) and replaced.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

FORMAT = "aimkern-dispatch"
VERSION = 1
FILENAME = "dispatch.json"


class DispatchWarning(UserWarning):
    """A candidate was rejected, a cache file was replaced or a recorded choice is unavailable."""


def _parse(text: str) -> dict:
    """The entries of a decisions file, or ValueError saying why it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not an aimkern dispatch file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"format version {data.get('version')!r}, this aimkern reads version {VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("chosen"), str) for v in entries.values()
    ):
        raise ValueError("its \"entries\" are not {key: {\"chosen\": name, ...}}")
    return entries


class DecisionCache:
    """The decisions file of one folder; ``get`` reads it once per process, ``put`` merges and replaces it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILENAME
        self._entries: Optional[dict] = None
        self._reported: set = set()

    def _report(self, reason: str, action: str = "it will be replaced") -> None:
        if reason not in self._reported:
            self._reported.add(reason)
            warnings.warn(f"aimkern.dispatch: the cache file {self.path} is {reason}; {action}",
                          DispatchWarning, stacklevel=4)

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._report(f"unreadable ({e.strerror})")
            return {}
        try:
            return _parse(text)
        except ValueError as e:
            self._report(str(e))
            return {}

    def get(self, key: str) -> Optional[dict]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / (FILENAME + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, key: str, entry: dict) -> None:
        """Merge ``entry`` under ``key`` into the file. A cache that cannot be written is reported, never
        fatal: the decision still holds for this process."""
        entry = dict(entry, decided_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            with self._locked():
                entries = self._read()  # what other processes wrote since we last looked
                entries[key] = entry
                text = json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}, indent=1,
                                  sort_keys=True)
                fd, tmp = tempfile.mkstemp(prefix=FILENAME + ".", suffix=".tmp", dir=self.folder)
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self._entries = entries
        except OSError as e:
            if self._entries is None:
                self._entries = {}
            self._entries[key] = entry
            self._report(f"not writable ({e.strerror or e})", "decisions are kept for this process only")
