"""Forced configs: which config of an autotuned Choice ``launch`` runs, when someone decided it beforehand.

Triton's autotuner picks among a Choice's configs from noisy timings, separately in each process, and keeps
the pick for that process only. The configs of one table can sum in different orders (the tiled attention
backward's dQ shares of 32 x 128 or 64 x 64 tiles; the CE's BLOCK_V 128 or 256), so two ranks, or a
resumed run, could compute different bits. This table lets whoever decides (``aimkern.dispatch``, with its
decision) fix the pick:

* ``force(kernel, key, config)``: a launch of the Choice named ``kernel`` whose autotune key is ``key``
  runs ``config`` directly, without benchmarking, also under Triton's interpreter (where it replaces the
  interpreter config). A forced config that is not one of the launched Choice's configs is a ValueError
  at the launch, naming the kernel, the config, where it was forced and the configs the Choice has.
* ``recording()``: the picks of the launches made inside the block (the autotuner's, read back from it
  after the launch, and the forced ones), so a decision can record what ran.
* ``pickable()``: every autotuned launch made inside the block, with all the configs its autotuner may
  pick; ``forcing(picks)`` forces picks for the block only. Dispatch's verification uses the two to run
  each config the autotuner may pick at the real shape, not only the one it picked at the small shape.

Only Choices with several configs are looked up: one config is never autotuned, and launchers size their
buffers by ``fixed_config`` of exactly those. A pick is plain data, JSON-able and picklable, so it goes into
the decisions file, a checkpoint and a pipe as it is::

    {"kernel": "attn_bwd_tiled_kernel", "key": [512, 64, true, false, "float16"],
     "config": {"kwargs": {"BLOCK_M": 32, "BLOCK_N": 128}, "num_warps": 8, "num_stages": 3}}

``key`` is the values of the Choice's autotune key arguments (``Choice.key``), then the inputs' dtype name
(Triton's own tuning cache adds the tensors' dtypes the same way).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import torch

_LOCK = threading.Lock()
_TABLE: dict = {}  # (kernel name, key tuple) -> (config identity tuple, pick dict, origin)
# The active recording() blocks. A plain list, not a ContextVar: autograd runs a CUDA backward on its own
# device thread, which does not see the caller's context, and the tiled backward is what must be recorded.
_RECORDERS: list = []
_PICKABLE: list = []  # the active pickable() blocks: {(kernel, key): [config record, ...]} each


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"an autotune key value must be a bool, int, float, str or None, got {type(value).__name__}")


def tune_key(choice, args: tuple, constexprs: dict, dtype: torch.dtype) -> tuple:
    """The key a launch of ``choice`` is tuned (and forced) under: its key arguments' values, then the dtype."""
    bound = dict(zip(choice.kernel.arg_names, args))
    bound.update(constexprs)
    return tuple(_plain(bound[k]) for k in choice.key if k in bound) + (str(dtype).replace("torch.", ""),)


def config_record(config) -> dict:
    """A triton.Config as plain data: ``{"kwargs", "num_warps", "num_stages"}``."""
    return {"kwargs": dict(sorted(config.kwargs.items())), "num_warps": int(config.num_warps),
            "num_stages": int(config.num_stages)}


def _identity(record: dict) -> tuple:
    return tuple(sorted(record["kwargs"].items())) + (("num_warps", record["num_warps"]),
                                                      ("num_stages", record["num_stages"]))


def check_pick(pick) -> dict:
    """``pick`` normalized (key a tuple), or a ValueError / TypeError saying what is wrong with it."""
    if not isinstance(pick, dict) or not {"kernel", "key", "config"} <= set(pick):
        raise ValueError(f"a forced config must be a dict with 'kernel', 'key' and 'config', got {pick!r}")
    kernel, key, config = pick["kernel"], pick["key"], pick["config"]
    if not isinstance(kernel, str) or not kernel:
        raise TypeError(f"a forced config's kernel must be a kernel name, got {kernel!r}")
    if not isinstance(key, (list, tuple)):
        raise TypeError(f"a forced config's key must be a list of values, got {type(key).__name__}")
    if hasattr(config, "kwargs") and hasattr(config, "num_warps"):  # a triton.Config
        config = config_record(config)
    if (not isinstance(config, dict) or not isinstance(config.get("kwargs"), dict)
            or not all(isinstance(config.get(k), int) for k in ("num_warps", "num_stages"))):
        raise ValueError(f"a forced config's config must be {{'kwargs': {{...}}, 'num_warps': int, 'num_stages': int}}"
                         f" or a triton.Config, got {config!r}")
    return {"kernel": kernel, "key": tuple(_plain(v) for v in key),
            "config": {"kwargs": dict(sorted(config["kwargs"].items())), "num_warps": config["num_warps"],
                       "num_stages": config["num_stages"]}}


def force(kernel: str, key, config, *, origin: str = "aimkern.ops._forced_configs.force", replace: bool = True) -> dict:
    """Launches of the Choice named ``kernel`` under autotune key ``key`` (``tune_key``) run ``config`` (a
    triton.Config or its ``config_record``). ``origin`` is named by the error of a config the Choice does not
    have. ``replace=False`` keeps a config already forced for that kernel and key. Returns the pick in force."""
    pick = check_pick({"kernel": kernel, "key": key, "config": config})
    slot = (pick["kernel"], pick["key"])
    with _LOCK:
        if replace or slot not in _TABLE:
            _TABLE[slot] = (_identity(pick["config"]), pick, origin)
        return _TABLE[slot][1]


def install(picks: Iterable[dict], *, origin: str, replace: bool = True) -> list:
    """``force`` each pick (``check_pick`` format); the picks in force for their kernels and keys."""
    return [force(p["kernel"], p["key"], p["config"], origin=origin, replace=replace)
            for p in [check_pick(p) for p in picks]]


def forced() -> list:
    """The picks in force, as plain data (what a worker process is given)."""
    with _LOCK:
        return [dict(entry[1], key=list(entry[1]["key"])) for entry in _TABLE.values()]


def clear() -> None:
    """Forget every forced config (launches autotune again)."""
    with _LOCK:
        _TABLE.clear()


def active() -> bool:
    """Whether a launch must compute its key: something is forced or recorded."""
    return bool(_TABLE) or bool(_RECORDERS) or bool(_PICKABLE)


def forced_config(choice, key: tuple):
    """The config of ``choice`` forced for ``key``, None when none is; a ValueError when the forced config
    is not one of ``choice``'s configs (a table that changed, another device's tables, a wrong pick)."""
    entry = _TABLE.get((choice.name, key))
    if entry is None:
        return None
    identity, pick, origin = entry
    for c in choice.configs:
        if _identity(config_record(c)) == identity:
            return c
    have = "; ".join(str(config_record(c)) for c in choice.configs)
    raise ValueError(f"{choice.name}: the config {pick['config']} forced for key {list(key)} (by {origin}) is not "
                     f"one of the configs this launch may run ({have}); force one of those, or clear the "
                     "forced configs (aimkern.dispatch.reset() clears those dispatch installed)")


def note(choice, key: tuple, config) -> None:
    """Tell the active ``recording()`` blocks that ``choice`` ran ``config`` under ``key``."""
    if _RECORDERS:
        pick = {"kernel": choice.name, "key": list(key), "config": config_record(config)}
        with _LOCK:
            for seen in _RECORDERS:
                seen[(choice.name, key)] = pick


def offered(choice, key: tuple) -> None:
    """Tell the active ``pickable()`` blocks that a launch of ``choice`` under ``key`` may run any of its
    configs (the launch layer calls it for launches the autotuner decides, or would on a GPU)."""
    if _PICKABLE:
        configs = [config_record(c) for c in choice.configs]
        with _LOCK:
            for seen in _PICKABLE:
                seen[(choice.name, key)] = configs


@contextlib.contextmanager
def pickable() -> Iterator[dict]:
    """``{(kernel, key): [config record, ...]}`` of the autotuned launches made while the block runs (in any
    thread), every config the autotuner may pick for each, in the yielded dict, filled as they launch."""
    seen: dict = {}
    with _LOCK:
        _PICKABLE.append(seen)
    try:
        yield seen
    finally:
        with _LOCK:
            _PICKABLE[:] = [r for r in _PICKABLE if r is not seen]


@contextlib.contextmanager
def forcing(picks: Iterable[dict], *, origin: str) -> Iterator[None]:
    """``force`` each pick while the block runs; the table is as before afterwards (picks forced before for
    the same kernels and keys come back)."""
    checked = [check_pick(p) for p in picks]
    slots = [(p["kernel"], p["key"]) for p in checked]
    with _LOCK:
        before = {slot: _TABLE[slot] for slot in slots if slot in _TABLE}
    try:
        install(checked, origin=origin)
        yield
    finally:
        with _LOCK:
            for slot in slots:
                if slot in before:
                    _TABLE[slot] = before[slot]
                else:
                    _TABLE.pop(slot, None)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The picks (one per kernel and key, the last config that ran) of the launches made while the block
    runs, in any thread (a backward on autograd's device thread too), in the yielded list, filled when the
    block ends. Dispatch decides one key at a time, so a block sees its own trial's launches."""
    seen: dict = {}
    out: list = []
    with _LOCK:
        _RECORDERS.append(seen)
    try:
        yield out
    finally:
        with _LOCK:
            _RECORDERS[:] = [r for r in _RECORDERS if r is not seen]  # by identity: nested blocks
        out.extend(seen.values())

