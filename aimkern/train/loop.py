"""The pretraining loop behind ``python -m aimkern.train``: ``open_session``, then ``train_step`` per step.

Between log steps nothing waits for the GPU: the step returns device tensors, the loss window adds them on
the device, and the preemption flag is agreed on the CPU control group. A log step reads the window (one
sync), checks the loss is finite and the bad samples within bounds, and writes a metrics.jsonl line.

Log steps: every ``--log-every`` steps and the schedule's last step. A stop before the schedule's end (a
preemption signal, ``--stop-at``) saves a checkpoint that holds the open loss window, and writes no line of
its own, so a resumed run logs exactly the lines an uninterrupted run does.

Stops on purpose (errors.py): a preemption signal (checkpoint, then exit 75), too many unreadable samples,
a NaN loss, a checkpoint that does not fit the run. A resumed run that has nothing left to train only does
what was asked (the probe) and keeps the summary of the training.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..distributed import DistEnv, setup, teardown
from .errors import BadDataError, DivergedError, Preempted
from .preemption import PreemptionGuard
from .session import Session, open_session
from .state import save_checkpoint
from .native import train_step_native
from .step import train_step
from .summary import build_summary, format_summary, probe, write_summary


def run(args) -> dict:
    """Train as ``args`` (from ``parse_args``) says; returns the run's summary (on every rank). Raises a
    ``RunError`` when the run cannot go on, ``Preempted`` after a preemption signal's checkpoint."""
    env = setup(args.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu":
        # Measured on a shared 2-core machine: the default run took 59 s with 1 thread, 257 s with 2.
        torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1))
    clean = False
    try:
        with PreemptionGuard() as guard:
            summary = _train(args, env, guard)
        clean = True
        return summary
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (tests call this in-process)
        teardown(env, barrier=clean)


def advance(s: Session, step: int) -> None:
    """One step of the loop without its log and save: the next batch, its bad samples, ``train_step``, the
    window. Never waits for the GPU (tests/test_train_multi.py checks it under CUDA's sync debug mode)."""
    batch = next(s.batches)
    s.bad.add(s.source.take_bad())
    if s.native:  # a pack of images at their own sizes
        out, images = train_step_native(s.run, batch, step)
        s.window.add(out)
        s.samples_seen += images
        s.window_images += images
        return
    s.window.add(train_step(s.run, batch, step))
    s.samples_seen += s.run.args.batch_size


def _train(args, env: DistEnv, guard: PreemptionGuard) -> dict:
    s = open_session(args, env)
    losses, intervals, model_sd = [], [], None
    try:
        for step in range(s.start_step, s.stop):
            advance(s, step)
            done = step + 1
            preempted = done < s.stop and guard.should_stop(env)  # collective: every rank stops at the same step
            if done % args.log_every == 0 or done == args.steps:
                losses.append(_log(s, done, intervals))
            s.console.tick()
            if done == s.stop or preempted or (args.save_every and done % args.save_every == 0):
                model_sd, saved_at = _save(s, done)
            if preempted:
                stopped = Preempted(guard.signal_name, done, saved_at)
                s.console.close()
                s.console.say(f"aimkern.train: {stopped}")
                raise stopped
    finally:
        s.console.close()
    summary = build_summary(args, s, losses, intervals, s.console.say)
    if args.probe:
        summary.update(probe(args, env, model_sd, s.console.say))
    write_summary(args, summary, env)
    s.console.say(format_summary(summary))
    return summary


def _enforce_bad(s: Session, done: int) -> None:
    """Past --max-bad-samples (merged over the ranks at this step): save, keeping the work, and stop."""
    try:
        s.bad.check(done)
    except BadDataError as stop:  # fix the data or raise the bound, then --resume
        _, path = save_checkpoint(s.run, step=done, samples_seen=s.samples_seen, bad=s.bad, window=s.window,
                                  say=s.console.warn, data=_data_state(s))
        raise BadDataError(f"{stop} (checkpoint {path or 'of step ' + str(done)} saved)") from None


def _log(s: Session, done: int, intervals: list) -> float:
    """A log step: the window's loss over all ranks, one metrics.jsonl line, then the checks; returns the loss.
    The line is written before --max-bad-samples can stop the run, so a resumed run does not miss it."""
    mean_loss, last = s.window.mean(s.run.env), s.window.last
    if not np.isfinite(mean_loss):
        raise DivergedError(f"the loss is {mean_loss} at step {done} (lr {last.lr:.3g}); lower --lr or check "
                            "the data, then --resume from the last checkpoint")
    s.bad.sync(s.run.env, s.console.warn, done)
    images, seconds = s.window.images_per_second(done, s.run.args.batch_size)
    if s.native:
        images, s.window_images = s.window_images, 0
    grad_norm = last.grad_norm.full_tensor() if hasattr(last.grad_norm, "full_tensor") else last.grad_norm
    s.metrics.write({
        "step": done, "loss": mean_loss, "lr": last.lr, "img_per_s": images / seconds, "grad_norm": float(grad_norm),
        "samples_seen": s.samples_seen, "bad_samples": s.bad.reads, "bad_files": len(s.bad.first),
        "new_bad": s.bad.since(s.window.since), "elapsed_s": time.perf_counter() - s.t_start,
    })
    intervals.append((images, seconds))
    s.console.show(done, loss=f"{mean_loss:.4f}", img_s=f"{images / seconds:.0f}", lr=f"{last.lr:.2e}")
    s.window.restart(done)
    _enforce_bad(s, done)
    return mean_loss


def _save(s: Session, done: int) -> tuple:
    s.bad.sync(s.run.env, s.console.warn, done)
    _enforce_bad(s, done)
    return save_checkpoint(s.run, step=done, samples_seen=s.samples_seen, bad=s.bad, window=s.window,
                           say=s.console.warn, data=_data_state(s))


def _data_state(s: Session):
    """--native: this rank's packer position (the packs a resumed run forms next); None otherwise."""
    return s.source.state() if s.native else None
