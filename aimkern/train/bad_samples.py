"""Unreadable samples: skipped deterministically, logged, counted, and bounded by ``--max-bad-samples``.

The data stream replaces a sample it cannot read with the next readable one of the dataset (same
augmentation seed), so a batch keeps its size and a resumed run reads exactly what an uninterrupted one
did. It reports each failure as (path, error); this tracker gathers them from every rank (at log and save
steps, which every rank reaches together), prints each file the first time, and stops the run when more
distinct files are bad than the bound allows.
"""
from __future__ import annotations

from typing import Callable, Optional

from .distributed import DistEnv, gather_objects
from .errors import BadDataError


def limit_of(max_bad: float, num_files: Optional[int]) -> float:
    """--max-bad-samples as a number of files: a count when >= 1, else a fraction of the dataset's files."""
    if max_bad >= 1 or not num_files:
        return max_bad
    return max_bad * num_files


class BadSamples:
    """Distinct unreadable files (``paths``) and how many reads failed (``reads``), over all ranks."""

    def __init__(self, max_bad: float, num_files: Optional[int]):
        self.max_bad, self.num_files = max_bad, num_files
        self.paths: dict = {}  # path -> first error message
        self.reads = 0
        self._pending: list = []  # this rank's (path, error) since the last sync

    def add(self, failures: list) -> None:
        self._pending.extend(failures)

    def sync(self, env: DistEnv, say: Callable[[str], None], step: int, enforce: bool = True) -> None:
        """Collective: merge every rank's new failures, print new files, and (``enforce``) raise BadDataError
        past the bound."""
        if env.distributed or self._pending:
            everyone = gather_objects(self._pending, env) if env.distributed else [self._pending]
            self._pending = []
            for failures in everyone:
                for path, error in failures:
                    self.reads += 1
                    if path not in self.paths:
                        self.paths[path] = error
                        say(f"skipped unreadable sample {path} at step {step}: {error}")
        limit = limit_of(self.max_bad, self.num_files)
        if enforce and len(self.paths) > limit:
            of = f" of {self.num_files}" if self.num_files else ""
            raise BadDataError(
                f"{len(self.paths)}{of} files are unreadable by step {step} (e.g. {next(iter(self.paths))}), more "
                f"than --max-bad-samples {self.max_bad:g} allows ({limit:g} files): fix the data, or raise the bound "
                "and --resume"
            )

    def state_dict(self) -> dict:
        return {"paths": dict(self.paths), "reads": self.reads}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.paths, self.reads = dict(state["paths"]), int(state["reads"])
