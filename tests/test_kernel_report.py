"""The compile gate itself (benchmarks/kernel_report.py): it compiles for a real GPU on this CPU machine, reads
what ptxas and the SASS say, and its rules catch what the interpreter cannot (a plain float jit global)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS, BENCH = os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")


def compile_rows(*jobs) -> list:
    """Rows of ``compile_job`` for (kernel in tests/gate_kernels.py, arch) pairs, compiled in a fresh process:
    in this one Triton's interpreter (the CPU tests) has patched triton.language, which breaks real compiles."""
    code = (
        f"import json, sys; sys.path[:0] = [{TESTS!r}, {BENCH!r}]\n"
        "import kernel_report as r\n"
        f"jobs = {list(jobs)!r}\n"
        "rows = [r.compile_job(r.Job('gate_kernels', k, (('ptr', 'float16', 0), 1000), {'BLOCK': 256}, 4, 1, a,"
        " 'fp16')) for k, a in jobs]\n"
        "print(json.dumps(rows))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


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


def test_plain_float_global_fails_the_gate(report):
    (row,) = compile_rows(("scale_plain_global", "sm_90a"))
    assert not row["ok"] and "SCALE" in row["error"], row["error"]
    assert report.violations(row) and report.violations(row)[0].startswith("compile failed")


def test_compiled_rows_have_the_resources(report):
    for row in compile_rows(("scale_constexpr_global", "sm_90a"), ("scale_constexpr_global", "sm_80")):
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
    # the Choice's shared-memory bound (the launch layer fits configs to a device by it) must hold
    assert report.violations({**ok, "shared_estimate": 1024}) == []
    assert "bound" in report.violations({**ok, "shared_estimate": 1000})[0]
    assert report.violations({**ok, "shared_estimate": None}) == []  # no bound: 16 KB at most
    assert "bound" in report.violations({**ok, "shared_estimate": None, "shared_bytes": 20_000})[0]
    # attention kernels are wgmma-only on sm_90a: one HMMA fails, except the D = 256 tiled backward
    assert "mma.sync" in report.violations({**ok, "mma": {"hgmma": 8, "hmma": 4}})[0]
    tiled = {**ok, "kernel": "attn_bwd_tiled_kernel", "mma": {"hgmma": 8, "hmma": 4}}
    assert report.violations({**tiled, "config": {**ok["config"], "BLOCK_D": 256}}) == []
    assert report.violations({**tiled, "config": {**ok["config"], "BLOCK_D": 64}})


def test_every_family_yields_launches_on_meta_tensors(report):
    """Each family's problems drive the real launchers; every kernel the ops launch is among them."""
    jobs = report.collect_jobs(list(report.FAMILIES), "gpu-run", ["sm_90a"])
    names = {job.kernel for job in jobs}
    assert names >= {"attn_fwd_kernel", "attn_fwd_tail_kernel", "attn_bwd_tiled_kernel", "attn_bwd_key_tail_kernel",
                     "attn_bwd_fused_kernel", "attn_bwd_preprocess_kernel", "ce_fwd_kernel", "ce_dlogits_kernel",
                     "ce_dlogits_inplace_kernel", "matmul_kernel",
                     "patch_embed_fwd_kernel", "patch_embed_dw_kernel", "patch_embed_dx_kernel", "pixel_loss_kernel"}
    assert sys.modules.get("aimkern.kernels.attention") is not None
