"""What ``--resume`` continues: the run's own options, from ``OUT/run.json``, not the command line's defaults.

A run writes its options to ``OUT/run.json`` when it starts (and again when a resume changes one of them);
every checkpoint holds the same dict. ``--resume`` takes the run-defining options (model, data, objective,
optimization, seed, ...) from there. An option given on the command line that differs from the saved one
is refused, with every difference listed, unless it is in ``CHANGEABLE``: options about how and how long
the run executes, which do not change what one step computes.

Each option's rule is its ``TrainConfig`` field's (config.py): the ``KEPT`` ones keep the saved value unless
given; the ``PER_INVOCATION`` ones take this command line's values (their defaults when not given), so
``--stop-at`` or ``--probe`` of an earlier invocation never sticks. No torch here: ``parse_args`` uses this
before anything heavy is imported.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from .config import KEPT, PER_INVOCATION, flag, options

RUN_FILE = "run.json"

# What may differ from the run's (the KEPT and PER_INVOCATION fields of TrainConfig), and what of it keeps the
# run's value when the command line does not give it (KEPT): both generated from the fields' resume rules.
CHANGEABLE = options(KEPT, PER_INVOCATION)
KEPT_WHEN_ABSENT = options(KEPT)


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
    """Record the paths ``aimkern.dispatch`` chose ({problem key: candidate, or the candidate with the
    autotuned configs its decision fixed}: ``dispatch.choices()``) in ``OUT/run.json`` (rank 0,
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
