"""On a GPU: the config Triton's autotuner picked is read back (``best_config``) and, forced, runs again bit
for bit without autotuning; a measured decision forces the configs it recorded (aimkern/ops/_forced_configs.py,
aimkern/dispatch/picks.py). Skipped without CUDA."""
import pytest
import torch

import aimkern
from aimkern import dispatch
from aimkern.ops import AttentionParams
from aimkern.ops import _forced_configs as forced_configs
from aimkern.ops.attention import attention_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, D = 384, 64  # fp16, long band: the tiled backward's table has (32 x 128) and (64 x 64), both padding nothing


@pytest.fixture(autouse=True)
def clean_table():
    forced_configs.clear()
    yield
    forced_configs.clear()


def _grads():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = [torch.randn(2, 4, N, D, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
               for _ in range(3)]
    o = attention_triton(q, k, v, None, AttentionParams(is_causal=True), backward="split")
    return torch.autograd.grad(o.float().square().sum(), [q, k, v])


def test_the_autotuners_pick_is_read_back_and_forced_runs_it_bit_for_bit():
    with forced_configs.recording() as ran:
        tuned = _grads()
    tiled = [p for p in ran if p["kernel"] == "attn_bwd_tiled_kernel"]
    assert len(tiled) == 1, ran
    forced_configs.install(tiled, origin="this test")
    with forced_configs.recording() as again:
        forced = _grads()
    assert [p for p in again if p["kernel"] == "attn_bwd_tiled_kernel"] == tiled
    for a, b in zip(tuned, forced):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_a_measured_decision_forces_the_configs_it_records(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    try:
        q, k, v = [torch.randn(2, 4, N, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]
        aimkern.attention(q, k, v, is_causal=True).float().sum().backward()
        (row,) = dispatch.report()
        installed = {(p["kernel"], tuple(p["key"])): p["config"] for p in forced_configs.forced()}
        for p in row["configs"]:
            assert installed[(p["kernel"], tuple(p["key"]))] == p["config"]
        assert row["configs"] == row["candidates"][row["chosen"]].get("configs", [])
    finally:
        dispatch.reset()
