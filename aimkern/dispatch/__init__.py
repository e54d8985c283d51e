"""``aimkern.dispatch``: which path each op call runs, chosen by measuring.

With ``backend="auto"`` (the default) the first call of an op for a key (device, versions, dtype, mask
kind, grad on or off, shape band) verifies every candidate that applies against the float64 reference
and times the correct ones at the real shape; the fastest runs from then on, and the choice is kept in
``$AIMKERN_CACHE_DIR/dispatch.json`` for later processes. The candidates are aimkern's Triton paths and
PyTorch's own (SDPA and its backends, conv2d, unfold + linear, chunked or fused cross-entropy, the
reference), plus any added with ``register``. ``AIMKERN_DISPATCH=fixed`` keeps the old rule (Triton on
CUDA, the reference elsewhere); ``backend="triton"`` / ``"reference"`` force a path.

    aimkern.dispatch.register("attention", "flex", my_flex_attention, supports=lambda p: p.device_type == "cuda")
    aimkern.dispatch.report()    # one row per decided key: chosen, from_cache, each candidate's ms / reason

``python -m aimkern.tune --preset vit-b16`` decides every op call of one training step and prints why.
"""
from .cache import DispatchWarning
from .core import (
    candidates, chosen_name, choices, choose, decision_key, pin, problem_key, register, report, reset, unregister,
)
from .environment import cache_dir, fingerprint, mode

__all__ = [
    "DispatchWarning", "cache_dir", "candidates", "chosen_name", "choices", "choose", "decision_key", "fingerprint",
    "mode", "pin", "problem_key", "register", "report", "reset", "unregister",
]
