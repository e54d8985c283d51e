"""Facts the Triton launchers share: the GPU's SM count and the tl.dot precision for an input dtype."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA, e.g. under Triton's interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def gemm_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision of the GEMM kernels: fp32 inputs get true fp32 products ("ieee"), like torch's
    default matmul (tf32 would miss the fp32 tolerances); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
