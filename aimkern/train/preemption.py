"""Preemption: SIGTERM and SIGUSR1 (what cluster schedulers send before a kill) end the run cleanly.

The handler only records the signal; the loop checks after each optimizer step, so the step in flight
finishes, a checkpoint is saved atomically and the process exits with ``errors.PREEMPTED_EXIT_CODE``.
Under torchrun the signal may reach the ranks at different steps (a scheduler signals the whole job, torchrun
forwards it once more): every rank reports whether it has seen one, an all-reduce of one int per step on
the CPU control group (gloo; no GPU sync, see ``aimkern.distributed``), and all stop after the same step, so
the collective save lines up. Handlers are installed only in the main thread and restored when the run ends.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from ..distributed import DistEnv, any_rank

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class PreemptionGuard:
    """Context manager: while active, SIGTERM / SIGUSR1 set ``received`` instead of killing the process."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, env: DistEnv) -> bool:
        """Whether any rank has received a preemption signal (collective under torchrun, on the CPU)."""
        return any_rank(self.received is not None, env)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a preemption signal"
