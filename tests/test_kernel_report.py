"""The compile gate itself (benchmarks/kernel_report.py): it compiles for a real GPU on this CPU machine, reads
what ptxas and the SASS say, and its rules catch what the interpreter cannot (a plain float jit global)."""
import importlib.util
import os
import sys

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.5  # a plain Python float: Triton's interpreter reads it, the compiler refuses it
SCALE_OK = tl.constexpr(0.5)


def _scale_plain_global(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)


def _scale_constexpr_global(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE_OK, mask=offs < n)


# JITFunction directly: @triton.jit would hand out interpreter functions here (conftest sets TRITON_INTERPRET
# on CPU machines), and those cannot be compiled.
_scale_plain_global = JITFunction(_scale_plain_global)
_scale_constexpr_global = JITFunction(_scale_constexpr_global)


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("kernel_report", os.path.join(ROOT, "benchmarks", "kernel_report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = module  # its dataclasses look their module up there
    interpret = os.environ.get("TRITON_INTERPRET")
    spec.loader.exec_module(module)  # it drops TRITON_INTERPRET for itself: put it back for the other tests
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = interpret
    return module


def _job(report, kernel: str, arch: str = "sm_90a"):
    return report.Job(__name__, kernel, (("ptr", "float16", 0), 1000), {"BLOCK": 256}, 4, 1, arch, "fp16")


def test_plain_float_global_fails_the_gate(report):
    row = report.compile_job(_job(report, "_scale_plain_global"))
    assert not row["ok"] and "SCALE" in row["error"]
    assert report.violations(row) and report.violations(row)[0].startswith("compile failed")


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_compiled_row_has_the_resources(report, arch):
    row = report.compile_job(_job(report, "_scale_constexpr_global", arch))
    assert row["ok"], row["error"]
    assert row["registers"] > 0 and row["spill_bytes"] == 0 and row["shared_bytes"] >= 0
    assert row["blocks_per_sm"] >= 1 and row["mma"] == {"hgmma": 0, "hmma": 0}
    assert not report.violations(row)  # no dot: not a main-loop kernel


def test_rules(report):
    ok = {"ok": True, "arch": "sm_90a", "kernel": "attn_fwd_kernel", "shared_bytes": 1024, "spill_bytes": 0,
          "config": {"dtype": "bf16"}, "mma": {"hgmma": 8, "hmma": 0}, "error": None}
    assert report.violations(ok) == []
    assert "spills" in report.violations({**ok, "spill_bytes": 8})[0]
    assert report.violations({**ok, "spill_bytes": 8, "config": {"dtype": "fp32"}}) == []  # fp32 may spill
    assert "wgmma" in report.violations({**ok, "mma": {"hgmma": 0, "hmma": 12}})[0]
    assert report.violations({**ok, "arch": "sm_80", "mma": {"hgmma": 0, "hmma": 12}}) == []
    assert "shared memory" in report.violations({**ok, "shared_bytes": 300_000})[0]


def test_every_family_yields_launches_on_meta_tensors(report):
    """Each family's problems drive the real launchers; every kernel the ops launch is among them."""
    jobs = report.collect_jobs(list(report.FAMILIES), "gpu-run", ["sm_90a"])
    names = {job.kernel for job in jobs}
    assert names >= {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_fused_kernel",
                     "attn_bwd_preprocess_kernel", "ce_fwd_kernel", "ce_dlogits_kernel", "matmul_kernel",
                     "patch_embed_fwd_kernel", "patch_embed_dw_kernel", "patch_embed_dx_kernel", "pixel_loss_kernel"}
    assert sys.modules.get("aimkern.kernels.attention") is not None
