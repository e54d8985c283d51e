"""Test setup: Triton's interpreter on CPU-only machines, seeded RNGs, and shared helpers.

TRITON_INTERPRET must be set before any @triton.jit kernel module is imported (Triton reads it when a
kernel is defined), so it is decided here, at collection time, before the tests import aimkern's kernels.
On a CUDA machine the same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hypothesis import settings  # noqa: E402

# Interpreter runs are slow: a small example budget, no deadline.
settings.register_profile("aimkern", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("aimkern")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
