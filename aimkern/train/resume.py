"""What ``--resume`` continues: the run's own options, from ``OUT/run.json``, not the command line's defaults.

A run writes its options to ``OUT/run.json`` when it starts (and again when a resume changes one of them);
every checkpoint holds the same dict. ``--resume`` takes the run-defining options (model, data, objective,
optimization, seed, ...) from there. An option given on the command line that differs from the saved one
is refused, with every difference listed, unless it is in ``CHANGEABLE``: options about how and how long
the run executes, which do not change what one step computes.

``--steps`` keeps the saved value unless given; the other changeable options take this command line's
values (their defaults when not given), so ``--stop-at`` or ``--probe`` of an earlier invocation never
sticks. No torch here: ``parse_args`` uses this before anything heavy is imported.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

RUN_FILE = "run.json"

# May differ from the checkpoint's (documented in --help and the README).
CHANGEABLE = (
    "steps", "stop_at", "save_every", "log_every", "keep", "probe", "no_progress", "workers", "threads", "device",
    "compile", "compile_backend", "checkpointing", "fsdp", "backend", "max_bad_samples", "resume", "out",
)
# Changeable, but kept from the run (not reset to the default) when the command line does not give them: a
# bare --resume must not quietly save less often, log differently or take another bad-data bound. The
# switches (--stop-at, --probe, --no-progress, --compile, --checkpointing, --fsdp) apply to one invocation.
KEPT_WHEN_ABSENT = ("steps", "save_every", "log_every", "keep", "max_bad_samples", "workers", "threads", "device",
                    "backend", "compile_backend")


def run_file(out_dir: str) -> str:
    return os.path.join(out_dir, RUN_FILE)


def saved_options(out_dir: str) -> Optional[dict]:
    """The options ``OUT/run.json`` recorded, or None when OUT holds no run."""
    path = run_file(out_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["args"]


def write_options(out_dir: str, options: dict) -> None:
    """Write the options into ``OUT/run.json`` atomically (rank 0), keeping its recorded dispatch choices."""
    _update(out_dir, args=options)


def write_dispatch(out_dir: str, choices: dict) -> None:
    """Record the paths ``aimkern.dispatch`` chose ({problem key: candidate}) in ``OUT/run.json`` (rank 0,
    at each checkpoint; the checkpoint holds the same dict, which is what --resume pins)."""
    _update(out_dir, dispatch=choices)


def _update(out_dir: str, **fields) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = run_file(out_dir)
    data = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}  # a torn or foreign run.json: rewritten whole below
    data.update(fields)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def differences(saved: dict, current: dict, keys: Iterable[str]) -> list:
    """'--opt NEW (checkpoint: OLD)' for each of ``keys`` outside CHANGEABLE whose values differ."""
    out = []
    for key in keys:
        if key in CHANGEABLE or key not in saved or key not in current:
            continue
        if current[key] != saved[key]:
            out.append(f"{flag(key)} {current[key]} (checkpoint: {saved[key]})")
    return out


def merge(parsed: dict, given: set, saved: dict) -> tuple:
    """(options of the resumed run, differences): ``saved`` with this command line's changeable options.

    ``parsed`` holds every option as parsed (defaults included), ``given`` the names the command line set."""
    diffs = differences(saved, parsed, sorted(given))
    merged = dict(parsed)  # options newer than the run keep their parsed values
    for key, value in saved.items():
        if key not in parsed:
            continue  # an option this version no longer has
        if key not in CHANGEABLE or (key in KEPT_WHEN_ABSENT and key not in given):
            merged[key] = value
    return merged, diffs
