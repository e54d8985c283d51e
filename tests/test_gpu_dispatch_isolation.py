"""On a GPU: a candidate that breaks the CUDA context is rejected as crashed in the worker, and this process's
context stays usable (aimkern/dispatch/isolation.py). Skipped without CUDA."""
import pytest
import torch

import aimkern
import dispatch_bad_candidates as bad
from aimkern import dispatch
from aimkern.dispatch import DispatchWarning

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.delenv("AIMKERN_DISPATCH_ISOLATE", raising=False)  # the default: isolated on CUDA
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    dispatch.register("attention", "device-assert", bad.device_assert)
    yield
    dispatch.unregister("attention", "device-assert")
    monkeypatch.undo()
    dispatch.reset()


def test_a_broken_cuda_context_stays_in_the_worker(isolated):
    q, k, v = [torch.randn(2, 4, 196, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    with pytest.warns(DispatchWarning, match=r"'device-assert' rejected: crashed \(CUDA error"):
        out = aimkern.attention(q, k, v, is_causal=True, prefix_len=98)
    out.float().sum().backward()
    torch.cuda.synchronize()  # this process's context is fine
    row = next(r for r in dispatch.report() if r["op"] == "attention")
    assert row["chosen"] != "device-assert" and row["real_shape_check"]["isolated"] is True
    ref = aimkern.attention(q, k, v, is_causal=True, prefix_len=98, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
