"""The problems the compile gate (benchmarks/kernel_report.py) drives the real launchers on, per family.

Each op's spec (aimkern/ops/specs/*.py) owns its family's problems as ``OpSpec.gate_problems``: subset ->
(label, thunk) pairs, where a thunk calls the op module's public launchers (``launch_*``) on meta tensors
(never run: the gate records the launches with ``observe(dry_run=True)``). Together they reach every entry
of every config table: each dtype, the head dims and sequence bands of the attention tables, every mask
variant, both attention backward paths, bias / label smoothing, big (autotuned) and small (fixed) GEMMs.
``subset="gpu-run"`` keeps what benchmarks/gpu_check.sh meets (16-bit, benchmark shapes).
"""
from __future__ import annotations

from aimkern.ops.spec import all_specs

# family (the kernel module's name, kernel_report.py's --family) -> subset -> (label, thunk) pairs
FAMILIES = {spec.family: spec.gate_problems for spec in all_specs() if spec.gate_problems is not None}
