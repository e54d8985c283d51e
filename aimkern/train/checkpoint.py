"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model and optimizer state (full, unsharded tensors even under FSDP2, so any world
size and a plain ``CausalViT`` can load them), the scheduler, the step, the data position (global samples
consumed) and every RNG state of every rank (Python, NumPy, torch CPU, CUDA). It is written to a temporary
file in the same directory and then renamed over ``checkpoint.pt``: a crash mid-write never leaves a
truncated latest checkpoint.
"""
from __future__ import annotations

import os
import random
from typing import Optional

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

CHECKPOINT_NAME = "checkpoint.pt"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_path(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINT_NAME)


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


def load(path: str) -> dict:
    """A checkpoint written by ``save_atomic`` (it holds NumPy RNG state, so it is not weights-only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
