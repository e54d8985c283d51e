"""Shared helpers for the benchmark scripts: timing, peak memory, and the table / JSON / PNG report.

Every benchmark measures aimkern beside its peers in the same run. Timing is the median of
``triton.testing.do_bench`` after warm-up; memory is the peak allocated beyond what was live before.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable, Optional, Sequence

import torch

# Reports go to $AIMKERN_BENCH_OUT when set (gpu_check.sh points it at the device tool's $OUT).
OUT_DIR = os.environ.get("AIMKERN_BENCH_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# Ceilings measured on the H200 (benchmarks/RESULTS.md, "Ceilings and peers"): bf16 dense matmul and device-to-device copy.
MATMUL_CEILING_TFLOPS = 765.0
COPY_CEILING_GBPS = 4200.0


def has_cuda() -> bool:
    return torch.cuda.is_available()


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU (triton.testing.do_bench, after warm-up)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def wall_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the CPU by the wall clock, read like do_bench: ``warmup`` ms of
    calls first, then calls for ``rep`` ms (at least one warm-up call and three timed ones)."""
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup:
        fn()
    times: list = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start) * 1e3 < rep:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated while running ``fn()`` once, beyond what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    import triton

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if has_cuda():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table; floats get 3 decimals, None prints as '-'."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = " | ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "-+-".join("-" * w for w in widths)
    body = "\n".join(" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return f"{line}\n{sep}\n{body}"


def write_report(
    name: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    *,
    chart: Optional[Callable[["object"], None]] = None,
    out_dir: str = OUT_DIR,
    extra: Optional[dict] = None,
) -> str:
    """Print the table, write ``out/<name>.json`` (rows + environment + ``extra``'s keys) and, if ``chart`` is
    given, ``out/<name>.png``.

    ``chart(ax)`` draws on a matplotlib Axes. Returns the JSON path.
    """
    os.makedirs(out_dir, exist_ok=True)
    print(format_table(rows, columns))
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": environment(), "rows": list(rows), **(extra or {})}, f, indent=1)
    if chart is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(10, 5))
            chart(ax)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
            plt.close(fig)
        except ImportError:
            print("(matplotlib not installed: no chart written; pip install matplotlib)")
    print(f"wrote {path}")
    return path


def no_cuda_notice(name: str) -> None:
    print(
        f"{name}: no CUDA device here, so no speed is measured. Running a small correctness sweep of the "
        "Triton kernels under Triton's interpreter instead."
    )
