"""The values check at the real shape (aimkern/dispatch/realshape.py), in this process (AIMKERN_DISPATCH_ISOLATE=0):
against the float64 reference where it fits in memory, else against PyTorch's fastest correct candidate."""
import pytest
import torch

import aimkern
import dispatch_bad_candidates as bad
from aimkern import dispatch
from aimkern.dispatch import DispatchWarning, realshape
from aimkern.specs import describe, get_spec


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_DISPATCH_ISOLATE", "0")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    added = []

    def register(name, fn):
        dispatch.register("attention", name, fn)
        added.append(name)

    yield register
    for name in added:
        dispatch.unregister("attention", name)
    monkeypatch.undo()
    dispatch.reset()


def _call():
    q, k, v = [torch.randn(2, 4, 40, 16, requires_grad=True) for _ in range(3)]
    out = aimkern.attention(q, k, v, is_causal=True)
    out.sum().backward()
    [row] = [r for r in dispatch.report() if r["op"] == "attention"]
    return row


def test_checked_against_the_reference_where_it_fits(in_process):
    in_process("wrong-heads", bad.wrong_when_many_heads)
    with pytest.warns(DispatchWarning, match=r"'wrong-heads' rejected: output 0: max error .* at the real shape "
                      r"\(against reference\)"):
        row = _call()
    assert row["real_shape_check"] == {"trusted": "float64 reference", "seconds": row["real_shape_check"]["seconds"],
                                       "isolated": False}
    assert row["real_shape_check"]["seconds"] > 0


def test_checked_against_pytorchs_fastest_where_the_reference_does_not_fit(in_process, monkeypatch):
    monkeypatch.setattr(realshape, "memory_budget", lambda device: 0)
    in_process("wrong-heads", bad.wrong_when_many_heads)
    in_process("nan-dq-heads", bad.nan_dq_when_many_heads)
    with pytest.warns(DispatchWarning) as record:
        row = _call()
    trusted = row["real_shape_check"]["trusted"]
    torch_timed = {n: r["ms"] for n, r in row["candidates"].items() if row["kinds"][n] == "torch" and r["ms"]}
    assert trusted == min(torch_timed, key=torch_timed.get)
    messages = [str(w.message) for w in record]
    assert any(f"'wrong-heads' rejected: output 0: max error" in m and f"(against {trusted})" in m for m in messages)
    assert any("'nan-dq-heads' rejected: NaN in dq at the real shape" in m for m in messages)


def test_the_attention_estimate_counts_the_scores():
    q = torch.empty(16, 12, 4096, 64)
    problem = describe("attention", (q, q, q, None), aimkern.ops.attention.AttentionParams(), q.dtype)
    assert realshape.reference_bytes(get_spec("attention"), problem) >= 8 * 16 * 12 * 4096 * 4096
