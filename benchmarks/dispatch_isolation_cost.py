"""What deciding in a worker process costs: the time of a first decision with and without isolation.

    python benchmarks/dispatch_isolation_cost.py [--device cpu|cuda] [--repeats 3] [--json FILE]

One attention key (B=8, H=4, N=196, D=64, causal + prefix, differentiated: the training step's kind of call)
is decided from nothing (a fresh decisions folder, ``dispatch.reset()``) in three ways, each ``--repeats``
times, interleaved:

  in-process       AIMKERN_DISPATCH_ISOLATE=0: verification, the real-shape check and timing in this process
  isolated, cold   AIMKERN_DISPATCH_ISOLATE=1 with no worker yet: its start (an interpreter importing torch and
                   aimkern) is paid by this decision
  isolated, warm   AIMKERN_DISPATCH_ISOLATE=1 with the worker started by an earlier key: what every later key pays

Each figure is the median wall time of ``aimkern.dispatch.choose``; ``check_s`` is what the values check at the
real shape took within it (``report()``'s ``real_shape_check``). A decision is taken once per key and machine
(the decisions file keeps it), so these are one-off costs, not per-call ones (benchmarks/dispatch_overhead.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from aimkern import dispatch
from aimkern.dispatch.environment import forced_mode
from aimkern.dispatch.isolation import WORKER
from aimkern.ops import AttentionParams
from aimkern.specs import Problem, get_spec

MODES = ("in-process", "isolated, cold", "isolated, warm")


def problem(device: str) -> Problem:
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    q = (8, 4, 196, 64)
    return Problem("attention", device, dtype, (q, q, q, (8,)), AttentionParams(is_causal=True),
                   (True, True, True, False), (dtype, dtype, dtype, "int32"))


def decide_once(mode: str, prob: Problem) -> tuple:
    """(seconds, check seconds) of one first decision of ``prob`` in ``mode``."""
    os.environ["AIMKERN_DISPATCH_ISOLATE"] = "0" if mode == "in-process" else "1"
    os.environ["AIMKERN_CACHE_DIR"] = tempfile.mkdtemp(prefix="aimkern-isolation-cost-")
    if mode == "isolated, cold":
        WORKER.stop()
    elif mode == "isolated, warm" and not WORKER.alive():
        WORKER.start()
    dispatch.reset()
    with forced_mode("measured"):
        t0 = time.perf_counter()
        dispatch.choose(get_spec("attention"), prob)
        seconds = time.perf_counter() - t0
    [row] = dispatch.report()
    return seconds, row["real_shape_check"]["seconds"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    prob = problem(args.device if args.device != "cuda" else "cuda:0")
    times = {m: [] for m in MODES}
    checks = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            s, c = decide_once(mode, prob)
            times[mode].append(s)
            checks[mode].append(c)
    WORKER.stop()
    result = {"device": args.device, "problem": "attention B=8 H=4 N=196 D=64 causal+prefix grad " + prob.dtype,
              "seconds": {m: statistics.median(v) for m, v in times.items()},
              "check_seconds": {m: statistics.median(v) for m, v in checks.items()},
              "repeats": args.repeats, "torch": torch.__version__}
    for mode in MODES:
        print(f"{mode:16s} first decision {result['seconds'][mode]:7.2f} s "
              f"(of which the real-shape check {result['check_seconds'][mode]:.2f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
