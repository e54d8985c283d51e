"""Every benchmark script runs on a CPU-only machine: it says no speed is measured and runs its interpreter
correctness check instead (which compares aimkern with its peers' math). Guards the scripts against drifting
from the library between GPU sessions."""
import os
import subprocess
import sys

import pytest

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["attn_throughput", "patch_embed", "pixel_loss", "cross_entropy", "pretrain_throughput"]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the scripts time the kernels (benchmarks/gpu_check.sh runs them)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_cpu_path(script, tmp_path):
    env = dict(os.environ, AIMKERN_BENCH_OUT=str(tmp_path), TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "no CUDA" in run.stdout
