"""What a dispatch decision depends on besides the problem: the machine and the software on it.

Two runs share a decision only when all of this matches: the device's name and capability, and the
torch, Triton and driver versions. ``AIMKERN_DISPATCH`` and ``AIMKERN_CACHE_DIR`` are read here too.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path
from typing import Iterator

MODES = ("measured", "fixed")


_FORCED: list = []  # modes set by forced_mode(), innermost last


def mode() -> str:
    """``AIMKERN_DISPATCH``: "measured" (default: verify and time the candidates on first use) or "fixed"
    (the rule without measuring: Triton on CUDA, the reference elsewhere). Read once per process (every op
    call asks; ``os.environ`` costs microseconds): ``refresh()`` reads it again."""
    if _FORCED:
        return _FORCED[-1]
    if _ENV_MODE[0] not in MODES:
        raise ValueError(f"AIMKERN_DISPATCH must be one of {MODES}, got {_ENV_MODE[0]!r}")
    return _ENV_MODE[0]


def _read_env_mode() -> str:
    return os.environ.get("AIMKERN_DISPATCH", "measured").strip().lower() or "measured"


# AIMKERN_DISPATCH as read at import or by refresh(): a constant by the time torch.compile traces mode().
_ENV_MODE: list = [_read_env_mode()]


def refresh() -> None:
    """Read ``AIMKERN_DISPATCH`` again (after changing it in this process)."""
    _ENV_MODE[0] = _read_env_mode()


@contextlib.contextmanager
def forced_mode(value: str) -> Iterator[None]:
    """Use dispatch mode ``value`` inside the block, whatever ``AIMKERN_DISPATCH`` says (``python -m
    aimkern.tune`` measures even where the environment says fixed)."""
    if value not in MODES:
        raise ValueError(f"dispatch mode must be one of {MODES}, got {value!r}")
    _FORCED.append(value)
    try:
        yield
    finally:
        _FORCED.pop()


def cache_dir() -> Path:
    """``AIMKERN_CACHE_DIR`` (default ``~/.cache/aimkern``): where decisions are kept between processes."""
    return Path(os.environ.get("AIMKERN_CACHE_DIR") or Path.home() / ".cache" / "aimkern")


def interpreter_allowed() -> bool:
    """``AIMKERN_DISPATCH_INTERPRETER=1`` makes Triton's interpreter a candidate on CPU (a correctness tool,
    so it is left out by default)."""
    return os.environ.get("AIMKERN_DISPATCH_INTERPRETER", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # no Triton (a CPU-only install can still use the reference paths)
        return "none"


@functools.lru_cache(maxsize=None)
def _device_facts(device: str) -> tuple:
    """(name, capability, driver) of a device string such as "cuda:0" or "cpu"."""
    import torch

    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        try:
            driver = str(torch._C._cuda_getDriverVersion())  # e.g. 12080; what torch.utils.collect_env reads
        except Exception:  # private API: fall back to the runtime torch was built with
            driver = f"cuda{torch.version.cuda}"
        return torch.cuda.get_device_name(index), f"sm{major}{minor}", driver
    return (platform.processor() or platform.machine() or "cpu"), f"{os.cpu_count()}cpu", "-"


@functools.lru_cache(maxsize=None)
def fingerprint(device: str) -> str:
    """The environment part of a decision key, e.g.
    "NVIDIA H200|sm90|torch2.11.0|triton3.6.0|driver12080"."""
    import torch

    name, capability, driver = _device_facts(device)
    return f"{name}|{capability}|torch{torch.__version__}|triton{_triton_version()}|driver{driver}"
