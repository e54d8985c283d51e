"""The gates CI runs beside the unit tests, collected here so that ``python -m pytest`` is the one test command.

A gate is a command that checks what the unit tests cannot (e.g. compiling every kernel for a real GPU with
Triton's bundled ptxas); it passes when the command exits 0. Each is one line of ``GATES``: a new gate drops in
with one line. They run from the repository root, with this interpreter's folder first on PATH (so ``python``
and ``pip`` in a gate's script are the project's venv) and without ``TRITON_INTERPRET`` (they compile for real).

    python -m pytest                    # everything CI runs, gates included
    python -m pytest -m "not gate"      # the unit tests only (a quick local run)
    python -m pytest -m gate            # the gates only
"""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

GATES = {  # name: (command, seconds allowed: a hang guard; each takes minutes on a 2-core CI machine)
    "compile gate, sm_90a + sm_80": ([PY, "benchmarks/kernel_report.py", "--quiet"], 3600),
    "compile gate on Triton 3.6, sm_90a": (["bash", "benchmarks/compile_gate_triton36.sh"], 3600),
    "kernel cost budgets": ([PY, "benchmarks/kernel_cost.py", "--quick", "--check"], 3600),
}


def run_gate(command: list, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the unit tests
    env["PATH"] = os.pathsep.join([os.path.dirname(PY), env.get("PATH", "")])
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.gate
@pytest.mark.parametrize("name", list(GATES))
def test_gate(name):
    command, timeout = GATES[name]
    t0 = time.perf_counter()
    proc = run_gate(command, timeout)
    print(f"{name}: {' '.join(command)} -> exit {proc.returncode} in {time.perf_counter() - t0:.0f}s")
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_a_failing_gate_fails():
    """The harness reads the exit status (a gate that cannot fail is no gate)."""
    assert run_gate([PY, "-c", "import sys; sys.exit(3)"], 60).returncode == 3
    assert "TRITON_INTERPRET" not in run_gate([PY, "-c", "import os; print(dict(os.environ))"], 60).stdout
