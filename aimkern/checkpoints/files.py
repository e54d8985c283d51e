"""Reading and writing checkpoint files: ``.pth`` / ``.pt`` / ``.bin`` (torch) and ``.safetensors``.

Torch files load with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs. An
``aimkern.train`` checkpoint also holds NumPy RNG state; the few NumPy types that needs are allow-listed for
that load (``numpy.ndarray`` and its dtypes), nothing else. safetensors files are read through the
``safetensors`` package (``pip install aimkern[safetensors]``), their string metadata included.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Tuple

import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - the package is installed with the [hf] extra
        raise ImportError("reading .safetensors files needs the safetensors package: pip install safetensors "
                          "(or aimkern[safetensors])") from e
    import safetensors

    return safetensors


def _numpy_safe_globals() -> list:
    """The NumPy globals an ``aimkern.train`` checkpoint's RNG state pickles (np.random.get_state())."""
    import numpy as np

    names = []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    names += [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    return names


def _suffix(path: str, where: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{where}: {path!r} must end in one of {', '.join(SUFFIXES)}")
    return suffix


def read_file(path: str) -> Tuple[dict, dict]:
    """(top-level object, metadata) of a checkpoint file. The object is whatever the file holds (a state dict,
    or a dict wrapping one); metadata is the safetensors header's string map ({} for torch files)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"src must be a path or a state dict, got {type(path).__name__}")
    path = os.fspath(path)
    suffix = _suffix(path, "src")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"src: no checkpoint file at {path!r}")
    if suffix == SAFETENSORS_SUFFIX:
        st = _safetensors()
        with st.safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:  # memory-mapped: tensors are read when used (a 7B backbone is not copied to inspect its shapes)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    return obj, {}


def write_file(state: dict, path: str, metadata: Optional[dict] = None) -> None:
    """Write a flat {name: tensor} ``state`` to ``path`` (format from the suffix). ``metadata`` (JSON-able) goes
    into the safetensors header, or beside the tensors as ``{"state_dict": ..., **metadata}`` in a torch file
    when given."""
    path = os.fspath(path)
    suffix = _suffix(path, "path")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if suffix == SAFETENSORS_SUFFIX:
        st = _safetensors()
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
        st.torch.save_file(state, path, metadata=meta or None)
        return
    torch.save({"state_dict": state, **metadata} if metadata else state, path)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (what run.json records for --init)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)
