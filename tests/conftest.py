"""Test setup: Triton's interpreter on CPU-only machines, seeded RNGs, and shared helpers.

TRITON_INTERPRET must be set before any @triton.jit kernel module is imported (Triton reads it when a
kernel is defined), so it is decided here, at collection time, before the tests import aimkern's kernels.
On a CUDA machine the same tests run the compiled kernels.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The op, model and training tests are about what each path computes: there backend="auto" keeps the fixed
# rule (Triton on CUDA, the reference elsewhere), so a test runs the path it names whatever the timings.
# tests/test_dispatch*.py measure for real. No test writes to the user's ~/.cache.
os.environ.setdefault("AIMKERN_DISPATCH", "fixed")
os.environ.setdefault("AIMKERN_CACHE_DIR", tempfile.mkdtemp(prefix="aimkern-test-cache-"))

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
def use_policy():
    """use_policy(**changes): run the rest of the test under aimkern.ops.launch_policy(**changes)."""
    import contextlib

    from aimkern.ops import launch_policy

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(launch_policy(**changes))


@pytest.fixture
def no_autotune():
    """On CUDA: the first config of each family, no autotuning (one compile per family, so the GPU run of
    the tests fits its budget); the benchmarks check the autotuned choices."""
    from aimkern.ops import launch_policy

    with launch_policy(autotune=False):
        yield


@pytest.fixture
def cuda_configs(monkeypatch):
    """cuda_configs(module, *builders): the named Choice builders of a kernels/ module hand out their first
    CUDA config as the interpreter's, so GPU-only tilings (masks at 128-wide tiles, splits) run under the
    interpreter too."""
    from aimkern.kernels.launch_table import Choice

    def patch(module, *names):
        for name in names:
            pick = getattr(module, name)

            def as_cuda(*args, pick=pick, **kwargs):
                c = pick(*args, **kwargs)
                return Choice(c.kernel, c.configs, c.configs[0], c.key, c.restore)

            monkeypatch.setattr(module, name, as_cuda)

    return patch


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
