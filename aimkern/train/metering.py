"""What a run reports while it trains: the loss window between log lines, metrics.jsonl, the progress bar.

A metrics.jsonl line at step s averages the loss over the steps since the previous line, weighted by counted
targets, over all ranks. The window's running sums stay on the device (adding to them never waits for the
GPU) and are read only at a log step. A checkpoint holds each rank's window, so the first line after a
``--resume`` averages the same steps, with the same float64 sums, as the uninterrupted run's line: every line
of a resumed run equals the uninterrupted run's, except the wall-clock fields (``WALL_CLOCK``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch

from ..distributed import DistEnv, all_reduce_sum
from .step import StepOut

METRICS_NAME = "metrics.jsonl"
WALL_CLOCK = ("img_per_s", "elapsed_s")  # the fields of a line that depend on the machine, not the run


class LogWindow:
    """This rank's loss sum (float64, weighted by targets) and target count since step ``since``, on the
    device; ``last`` is the latest step's output (its lr and gradient norm go into the line)."""

    def __init__(self, device: torch.device, since: int):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count, self.since, self.last = 0, since, None
        self.timed_from, self.t0 = since, time.perf_counter()  # throughput: steps of this invocation only

    def add(self, out: StepOut) -> None:
        self.sum += out.loss.double() * out.targets
        self.count += out.targets
        self.last = out

    def mean(self, env: DistEnv) -> float:
        """The window's loss over every rank (collective; reads the device: a log step's one sync)."""
        totals = all_reduce_sum(torch.stack([self.sum, self.sum.new_tensor(float(self.count))]), env)
        return (totals[0] / totals[1]).item()

    def images_per_second(self, step: int, global_batch: int) -> tuple:
        """(images, seconds) since the window opened or this invocation began."""
        return (step - self.timed_from) * global_batch, time.perf_counter() - self.t0

    def restart(self, step: int) -> None:
        self.sum.zero_()
        self.count, self.since, self.timed_from, self.t0 = 0, step, step, time.perf_counter()

    def state(self) -> tuple:
        """This rank's (sum, count, since) for a checkpoint (reads the device: save steps only)."""
        return float(self.sum), self.count, self.since

    def load(self, saved: Optional[list], rank: int, same_world: bool) -> None:
        """Restore from a checkpoint's per-rank states; on another world size, rank 0 takes the whole window."""
        if not saved:
            return
        if same_world:
            total, count, since = saved[rank]
        else:
            total = sum(s[0] for s in saved) if rank == 0 else 0.0
            count, since = (sum(s[1] for s in saved) if rank == 0 else 0), saved[0][2]
        self.sum.fill_(total)
        self.count, self.since = count, since


class MetricsLog:
    """``OUT/metrics.jsonl``: one JSON object per logged step (rank 0 only). A resumed run first drops the
    lines after its checkpoint's step (written by the interrupted run after its last save)."""

    def __init__(self, out_dir: str, start_step: int, enabled: bool):
        self.path = os.path.join(out_dir, METRICS_NAME)
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Console:
    """Rank 0's messages: ``say`` on stdout, ``warn`` on stderr, both around the progress bar when there is one.

    The bar is tqdm's, on stderr, and only when stderr is a terminal (``disable=None``): a scheduler's log
    file would otherwise fill with carriage-return updates. Without a bar (not a terminal, --no-progress),
    each log step's figures are one line on stdout instead."""

    def __init__(self, env: DistEnv):
        self.env, self.bar, self.total = env, None, None

    def progress(self, total: int, initial: int, enabled: bool) -> None:
        self.total = total
        if enabled and self.env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain", disable=None)
            self.bar = None if bar.disable else bar

    def say(self, msg: str, file=None) -> None:
        if self.env.is_main:
            file = file or sys.stdout
            if self.bar is not None:
                self.bar.write(msg, file=file)
            else:
                print(msg, file=file, flush=True)

    def warn(self, msg: str) -> None:
        self.say(msg, file=sys.stderr)

    def tick(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, **postfix) -> None:
        """The latest log line's figures: beside the bar, or as a line of their own when there is none."""
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
        else:
            self.say(f"step {step}/{self.total}: " + ", ".join(f"{k}={v}" for k, v in postfix.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
