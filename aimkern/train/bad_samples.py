"""Samples that failed to decode, over all ranks: reported, counted, and bounded by ``--max-bad-samples``.

Every stream replaces a sample it cannot decode by a seeded draw (``aimkern.data.bad``), so a batch keeps
its size and a resumed run reads exactly what an uninterrupted one did, and hands over a ``BadRecord`` per
skip. This tracker gathers them from every rank at log and save steps (which every rank reaches together),
prints each sample the first time on stderr, lists it in the next metrics.jsonl line and in summary.json,
and stops the run when more distinct samples are bad than the bound allows.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from ..data.bad import BadRecord, describe
from ..distributed import DistEnv, gather_objects
from .errors import BadDataError


def limit_of(max_bad: float, num_samples: Optional[int]) -> float:
    """--max-bad-samples as a number of samples: a count when >= 1, else a fraction of the dataset."""
    if max_bad >= 1 or not num_samples:
        return max_bad
    return max_bad * num_samples


class BadSamples:
    """Distinct bad samples (``first``: sample -> (record, the step it was first reported at)) and how many
    reads failed (``reads``), over all ranks."""

    def __init__(self, max_bad: float, num_samples: Optional[int] = None):
        self.max_bad, self.num_samples = max_bad, num_samples
        self.first: Dict[str, Tuple[BadRecord, int]] = {}
        self.reads = 0
        self._pending: List[BadRecord] = []  # this rank's records since the last sync

    def add(self, records: List[BadRecord]) -> None:
        self._pending.extend(records)

    def sync(self, env: DistEnv, warn: Callable[[str], None], step: int) -> None:
        """Collective: merge every rank's new records; ``warn`` each new sample (one line, rank 0 only)."""
        if not (env.distributed or self._pending):
            return
        everyone = gather_objects(self._pending, env)
        self._pending = []
        for records in everyone:
            for rec in records:
                self.reads += 1
                if rec.sample not in self.first:
                    self.first[rec.sample] = (BadRecord(*rec), step)
                    if env.is_main:
                        warn(f"aimkern.train: {describe(rec, f' at step {step}')}")

    def check(self, step: int) -> None:
        """BadDataError when more distinct samples are bad than --max-bad-samples allows."""
        limit = limit_of(self.max_bad, self.num_samples)
        if len(self.first) > limit:
            of = f" of {self.num_samples}" if self.num_samples else ""
            raise BadDataError(
                f"{len(self.first)}{of} samples are unreadable by step {step} (e.g. {next(iter(self.first))}), "
                f"more than --max-bad-samples {self.max_bad:g} allows ({limit:g}): fix the data, or raise the bound "
                "and --resume"
            )

    def since(self, step: int) -> List[dict]:
        """The records first reported after ``step`` (what a metrics.jsonl line lists), in report order."""
        return [rec.to_json() for rec, at in self.first.values() if at > step]

    def records(self) -> List[dict]:
        """Every distinct bad sample's record, sorted by sample (summary.json's ``bad_files``)."""
        return [self.first[k][0].to_json() for k in sorted(self.first)]

    def state_dict(self) -> dict:
        return {"records": [[*rec, at] for rec, at in self.first.values()], "reads": self.reads}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        self.reads = int(state["reads"])
        if "records" in state:
            self.first = {r[0]: (BadRecord(*r[:3]), int(r[3])) for r in state["records"]}
        else:  # a checkpoint from before records: {path: "Error: message"}
            self.first = {p: (BadRecord(p, *(e.split(": ", 1) + [""])[:2]), 0) for p, e in state["paths"].items()}
