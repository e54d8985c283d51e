"""The ways a run stops on purpose, each with its exit status (documented in ``--help`` and the README).

``python -m aimkern.train`` prints a ``RunError`` as one line (no traceback) and exits with its
``exit_code``; in-process callers of ``aimkern.train.train`` get the exception itself.

    0   the run finished (or had nothing left to do)
    1   BadDataError / DivergedError: the data or the optimization went wrong; fix it, then --resume
    2   a bad option (argparse), or ResumeError: the checkpoint and the command line disagree
    75  Preempted: SIGTERM / SIGUSR1 arrived; a checkpoint was saved; run again with --resume
        (75 is EX_TEMPFAIL of sysexits.h: "try again later", what a scheduler's requeue hook looks for)
"""
from __future__ import annotations

PREEMPTED_EXIT_CODE = 75


class RunError(Exception):
    """A run that cannot go on; the message says why and what to do."""

    exit_code = 1


class ResumeError(RunError, ValueError):
    """--resume cannot continue: options that differ from the checkpoint's, or an unusable checkpoint."""

    exit_code = 2


class BadDataError(RunError):
    """More unreadable samples than --max-bad-samples allows."""


class DivergedError(RunError, FloatingPointError):
    """The loss became NaN or infinite."""


class Preempted(SystemExit):
    """A preemption signal was handled: the step finished and a checkpoint was saved. A SystemExit, so the
    process exits with PREEMPTED_EXIT_CODE without a traceback."""

    def __init__(self, signal_name: str, step: int, path: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name, self.step, self.path = signal_name, step, path

    def __str__(self) -> str:
        return (f"{self.signal_name} received: stopped after step {self.step}, checkpoint {self.path} saved; "
                f"continue with --resume (exit status {PREEMPTED_EXIT_CODE})")
