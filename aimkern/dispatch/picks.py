"""The autotuned configs a decision fixes: deterministic means the same sums on every rank and on resume.

Triton's autotuner picks among configs that sum in different orders (the tiled attention backward's dQ
shares, the CE's BLOCK_V), from noisy timings, separately in each process. So a deterministic problem
(``deterministic=True``, the default, where the op's params have that field; the ops without it always
promise fixed-order sums) records, with its decision, the config each autotuned kernel of the chosen
candidate ran while it was timed at the real shape (``trial.trial``'s ``"configs"``), and forces them
(``ops._forced_configs``) for every later launch of this process: they go into the decisions file, are
broadcast with the decision under torchrun, and are part of a training run's recorded choices
(``choices()``), which ``pin`` installs on ``--resume`` before the first step.

A recorded choice is the candidate's name, or, where the decision fixed configs::

    {"chosen": NAME, "configs": [pick, ...], "environment": FINGERPRINT, "device": "cuda"}

Configs are installed only where the environment matches (another GPU has other tables: there the key is
autotuned again, said once). The first config forced for a kernel and key stays for the process (a later
decision's trials already ran it), except that a resumed run's recorded ones replace any.
"""
from __future__ import annotations

from typing import Optional

from ..ops import _forced_configs
from ..specs import Problem
from . import environment


def wanted(problem: Problem) -> bool:
    """Whether ``problem``'s decision fixes its autotuned configs (all but ``deterministic=False``)."""
    return getattr(problem.params, "deterministic", True) is not False


def install(configs: list, origin: str, replace: bool = False) -> list:
    """Force ``configs``; the picks now in force for their kernels and keys (keys as lists: JSON's form)."""
    return [dict(p, key=list(p["key"])) for p in _forced_configs.install(configs, origin=origin, replace=replace)]


def recorded(row: dict):
    """The value ``choices()`` records for a decision's row: the name, or the dict with its configs."""
    if not row.get("configs"):
        return row["chosen"]
    env = row["key"][len(row["problem_key"]) + 1:]
    return {"chosen": row["chosen"], "configs": row["configs"], "environment": env,
            "device": row["problem"]["device"].split(":")[0]}


def parse(key: str, value) -> tuple:
    """(name, configs, environment, device type) of a recorded choice; TypeError naming ``key`` if malformed."""
    if isinstance(value, str):
        return value, [], None, None
    if not isinstance(value, dict) or not isinstance(value.get("chosen"), str):
        raise TypeError(f"aimkern.dispatch.pin: the recorded choice of {key!r} must be a candidate name or "
                        f"{{'chosen': name, 'configs': [...], 'environment': ..., 'device': ...}}, got {value!r}")
    configs = value.get("configs") or []
    try:
        configs = [_forced_configs.check_pick(p) for p in configs]
    except (TypeError, ValueError) as e:
        raise TypeError(f"aimkern.dispatch.pin: the recorded configs of {key!r}: {e}") from None
    return value["chosen"], [dict(p, key=list(p["key"])) for p in configs], value.get("environment"), \
        value.get("device")


def environment_here(environment_text: Optional[str], device: Optional[str]) -> Optional[str]:
    """This machine's fingerprint when it is ``environment_text`` (on ``device``'s type), else None."""
    if not environment_text or not device:
        return None
    try:
        here = environment.fingerprint(device)
    except Exception:  # no such device here (a CUDA run resumed on a CPU)
        return None
    return here if here == environment_text else None


def usable(configs) -> Optional[list]:
    """A decisions-file entry's configs, checked (None when malformed: the entry is measured again)."""
    try:
        return [dict(p, key=list(p["key"])) for p in (_forced_configs.check_pick(p) for p in configs or [])]
    except (TypeError, ValueError):
        return None
