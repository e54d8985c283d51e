"""Count the work the real kernels issue, while they run under Triton's interpreter.

The CPU stand-in for a profiler (benchmarks/kernel_cost.py): inside ``count_work()`` every ``tl.dot`` adds
its M x N x K multiply-adds, and every load / store / atomic its requested global-memory bytes (masked-off
elements excluded), to the kernel that issued it. The counts are what the kernel's code asks of the
hardware for the tiles it really visits: padded dot shapes count in full (a 196-token head padded to 256
issues 256-wide dots), skipped tiles count nothing. Nothing is timed.

Only the interpreter's builder is patched, and only inside the block, so ordinary interpreter runs are
not slowed. Inside the block 16-bit dots are computed in float32 (numpy has no fast fp16 matmul): the
counts are exact, the values are float32-accurate, which is all a cost report needs.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass
class KernelWork:
    """What one kernel issued over all its launches inside a ``count_work()`` block."""

    launches: int = 0
    macs: int = 0  # sum of M * N * K over its tl.dot calls (batched dots: times the batch)
    dots: int = 0  # tl.dot calls
    load_bytes: int = 0  # bytes of unmasked elements loaded (atomics count as load + store)
    store_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes


@dataclass
class WorkCount:
    """Per-kernel ``KernelWork`` of a ``count_work()`` block, by kernel name."""

    kernels: dict = field(default_factory=lambda: defaultdict(KernelWork))

    @property
    def macs(self) -> int:
        return sum(k.macs for k in self.kernels.values())

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kernels.values())

    def of(self, *names: str) -> KernelWork:
        """The summed work of the named kernels (absent names count zero)."""
        total = KernelWork()
        for n in names:
            k = self.kernels.get(n)
            if k is not None:
                total.launches += k.launches
                total.macs += k.macs
                total.dots += k.dots
                total.load_bytes += k.load_bytes
                total.store_bytes += k.store_bytes
        return total


def _elem_bytes(ptr_handle) -> int:
    return max(1, ptr_handle.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def count_work() -> Iterator[WorkCount]:
    """Count dots and memory traffic of every interpreted kernel launched inside the block."""
    from triton.runtime import interpreter as interp

    if not hasattr(interp, "InterpreterBuilder") or not hasattr(interp, "GridExecutor"):
        raise RuntimeError("count_work: this Triton's interpreter has no InterpreterBuilder / GridExecutor")
    builder_cls = interp.InterpreterBuilder
    executor_cls = interp.GridExecutor
    saved = {name: getattr(builder_cls, name) for name in
             ("create_dot", "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_call = executor_cls.__call__
    result = WorkCount()
    current: list = []  # stack of kernel names (a kernel launch never nests, but be safe)

    def work() -> KernelWork:
        return result.kernels[current[-1] if current else "<outside a kernel>"]

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_shape, b_shape = a.data.shape, b.data.shape
        batch = int(np.prod(a_shape[:-2])) if len(a_shape) > 2 else 1
        w = work()
        w.macs += batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
        w.dots += 1
        if a.data.dtype == np.float16 and b.data.dtype == np.float16:
            out = np.matmul(a.data.astype(np.float32), b.data.astype(np.float32)).astype(d.data.dtype) + d.data
            return interp.TensorHandle(out, d.dtype.scalar)
        return saved["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        work().load_bytes += int(np.count_nonzero(mask.data)) * _elem_bytes(ptrs)
        return saved["create_masked_load"](self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        work().store_bytes += int(np.count_nonzero(mask.data)) * _elem_bytes(ptrs)
        return saved["create_masked_store"](self, ptrs, value, mask, cache_modifier, eviction_policy)

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        n = int(np.count_nonzero(mask.data)) * _elem_bytes(ptr)
        w = work()
        w.load_bytes += n
        w.store_bytes += n
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        n = int(np.asarray(ptr.data).size) * _elem_bytes(ptr)
        w = work()
        w.load_bytes += n
        w.store_bytes += n
        return saved["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    def call(self, *args, **kwargs):
        current.append(getattr(self.fn, "__name__", "<kernel>"))
        result.kernels[current[-1]].launches += 1
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            current.pop()

    patched = dict(create_dot=create_dot, create_masked_load=create_masked_load,
                   create_masked_store=create_masked_store, create_atomic_rmw=create_atomic_rmw,
                   create_atomic_cas=create_atomic_cas)
    for name, fn in patched.items():
        setattr(builder_cls, name, fn)
    executor_cls.__call__ = call
    try:
        yield result
    finally:
        for name, fn in saved.items():
            setattr(builder_cls, name, fn)
        executor_cls.__call__ = saved_call
