"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model and optimizer state (full, unsharded tensors even under FSDP2, so any world
size and a plain ``CausalViT`` can load them), the scheduler, the step, the data position (global samples
consumed) and every RNG state of every rank (Python, NumPy, torch CPU, CUDA). It is written to a temporary
file in the same directory and then renamed: a crash mid-write never leaves a truncated checkpoint.

Files: ``checkpoint-STEP.pt`` (8-digit step) for the last ``--keep`` saves, and ``checkpoint.pt``, a hard link
to the latest (a copy where the filesystem has no hard links), the stable name for tools. Resuming tries the
newest first; an unreadable one (a disk that filled up, a copy cut short) is reported by name and the one
before is used.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# The run's file names and reading one live below both train and eval (eval reads what train writes).
from ..checkpoints.run_files import CHECKPOINT_NAME, checkpoint_path, load, step_files, step_path  # noqa: F401

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------
def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """Full (unsharded, CPU) model and optimizer state dicts. Collective under FSDP2: call on every rank;
    ``model`` is the unwrapped module (not the DDP wrapper or the compiled module)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_model_and_optimizer_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd: dict,
                                   optim_sd: Optional[dict]) -> None:
    """Load full state dicts (from ``model_and_optimizer_state``) into a plain, DDP'd or FSDP2-sharded model."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


# ------------------------------------------------------------------------------------------------------
def save_atomic(state: dict, path: str) -> None:
    """torch.save to ``path.tmp`` (flushed to disk), then rename over ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_step(state: dict, out_dir: str, keep: int) -> str:
    """Write ``state`` as OUT/checkpoint-STEP.pt (atomically), point checkpoint.pt at it, and delete the
    step files beyond ``keep`` and any newer than this step (left by a timeline that a resume abandoned,
    e.g. after a corrupt checkpoint). Returns the path written."""
    step = int(state["step"])
    path = step_path(out_dir, step)
    save_atomic(state, path)
    latest = checkpoint_path(out_dir)
    tmp = f"{latest}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here (some network filesystems): a copy, still renamed atomically
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    files = step_files(out_dir)
    stale = [p for s, p in files if s > step] + [p for s, p in files if s <= step][:-keep]
    for p in stale:
        os.remove(p)
    return path


def load_latest(out_dir: str, warn: Callable[[str], None] = print) -> tuple:
    """(state, path) of OUT's newest readable checkpoint, or (None, None) when OUT has none. An unreadable
    one is reported through ``warn`` (naming the file and the error) and the one before it is tried; when
    none can be read, ``ResumeError`` lists them."""
    from .errors import ResumeError

    candidates = [p for _, p in reversed(step_files(out_dir))]
    if not candidates and os.path.isfile(checkpoint_path(out_dir)):
        candidates = [checkpoint_path(out_dir)]  # a run from before step files
    failed = []
    for path in candidates:
        try:
            state = load(path)
            if not isinstance(state, dict) or "step" not in state or "model" not in state:
                raise ValueError("not an aimkern.train checkpoint")
            return state, path
        except Exception as e:  # torch.load's errors on a cut file vary: RuntimeError, EOFError, pickle's
            failed.append(path)
            warn(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
                 + ("; falling back to the one before" if path != candidates[-1] else ""))
    if failed:
        raise ResumeError(f"no readable checkpoint in {out_dir}: {', '.join(failed)} failed to load")
    return None, None


def set_aside_newer(out_dir: str, step: int) -> list:
    """Rename the step files newer than ``step`` (the unreadable ones a resume fell back past) to
    ``*.pt.unreadable``: kept for inspection, but no longer counted by ``save_step``'s --keep rotation, which
    would otherwise keep them and delete the readable checkpoint the run resumed from. Returns the new names."""
    moved = []
    for s, path in step_files(out_dir):
        if s > step:
            os.replace(path, f"{path}.unreadable")
            moved.append(f"{path}.unreadable")
    return moved

