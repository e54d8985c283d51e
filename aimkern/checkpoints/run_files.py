"""The files of a training run's checkpoints: their names, and reading one.

``aimkern.train`` writes them (``aimkern.train.checkpoint``: atomic saves, rotation, RNG state) and
``aimkern.eval`` reads them; both build on this module, so neither package imports the other for it.

Files: ``OUT/checkpoint-STEP.pt`` (8-digit step) for the last ``--keep`` saves, and ``OUT/checkpoint.pt``, a
hard link to the latest (a copy where the filesystem has no hard links), the stable name for tools.
"""
from __future__ import annotations

import glob
import os
import re

import torch

CHECKPOINT_NAME = "checkpoint.pt"
_STEP_FILE = re.compile(r"checkpoint-(\d+)\.pt$")


def checkpoint_path(out_dir: str) -> str:
    """OUT/checkpoint.pt: the latest checkpoint (a link to the newest checkpoint-STEP.pt)."""
    return os.path.join(out_dir, CHECKPOINT_NAME)


def step_path(out_dir: str, step: int) -> str:
    """OUT/checkpoint-STEP.pt, the step written with 8 digits."""
    return os.path.join(out_dir, f"checkpoint-{step:08d}.pt")


def step_files(out_dir: str) -> list:
    """(step, path) of OUT's checkpoint-STEP.pt files, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(str(out_dir)), "checkpoint-*.pt")):
        m = _STEP_FILE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def load(path: str) -> dict:
    """A checkpoint written by ``aimkern.train`` (it holds NumPy RNG state, so it is not weights-only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
