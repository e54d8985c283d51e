"""Importable attention candidates that misbehave, for tests/test_dispatch_isolation.py: the dispatch worker
imports them by ``fn.__module__`` + ``fn.__qualname__`` and tries them there, never in the test's process.

Each takes the public op's arguments (``aimkern.dispatch.register``'s convention). The "when long" ones are
right at small N and wrong above N = 100, as cuDNN's SDPA backward is (NaN in dQ at N % 128 == 64 with an
explicit mask, pytorch/pytorch#196678): the verification problem, which keeps the real N up to 1024, catches
them. The "when many heads" ones are wrong only with more heads than the CPU's verification problem has
(2 x 2): only the check at the real shape can catch them.
"""
import os
import time

import torch

from aimkern.reference import attention_reference

LONG = 100  # above this N the "when long" candidates go wrong
MANY = 4  # above this many heads (B * H) the "when many heads" ones do: more than the CPU's verification problem has


def _reference(q, k, v, *, is_causal, block_size, prefix_len, scale, deterministic):
    return attention_reference(q, k, v, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len,
                               scale=scale)


def aborts(q, k, v, **kw):
    """Kills its process with SIGABRT, as a failed device assertion or a corrupted heap does."""
    os.abort()


def hangs(q, k, v, **kw):
    """Never returns, like a spin-wait on a block that was never scheduled."""
    while True:
        time.sleep(1)


class _NanGrad(torch.autograd.Function):
    """Identity forward; a backward whose gradient is NaN (the cuDNN dQ bug's shape)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def nan_dq_when_long(q, k, v, **kw):
    """The reference, but dq is NaN when N > 100."""
    if q.shape[2] > LONG:
        q = _NanGrad.apply(q)
    return _reference(q, k, v, **kw)


def wrong_when_long(q, k, v, **kw):
    """The reference, but 1 % off (finite) when N > 100."""
    out = _reference(q, k, v, **kw)
    return out * 1.01 if q.shape[2] > LONG else out


def _many(q) -> bool:
    return q.shape[0] * q.shape[1] > MANY


def nan_dq_when_many_heads(q, k, v, **kw):
    """The reference, but dq is NaN when B * H > 4: wrong only at the real shape."""
    if _many(q):
        q = _NanGrad.apply(q)
    return _reference(q, k, v, **kw)


def wrong_when_many_heads(q, k, v, **kw):
    """The reference, but 1 % off (finite) when B * H > 4: wrong only at the real shape."""
    out = _reference(q, k, v, **kw)
    return out * 1.01 if _many(q) else out


def fast_and_right(q, k, v, **kw):
    """The reference, importable: a well-behaved user candidate the worker can run."""
    return _reference(q, k, v, **kw)


def device_assert(q, k, v, **kw):
    """An out-of-bounds index on the GPU: a device-side assert, which leaves the CUDA context unusable."""
    out = _reference(q, k, v, **kw)
    far = torch.full((1,), q.numel() * 1000, device=q.device, dtype=torch.long)
    return out + q.flatten()[far].sum() * 0
