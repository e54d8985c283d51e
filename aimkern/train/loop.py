"""The pretraining loop behind ``python -m aimkern.train``.

One step: the next global batch (this rank's rows), AIM's per-image prefix, the next-patch loss under bf16
autocast (CUDA), backward, global-norm clipping, AdamW, the LR schedule. Everything random in a step is
drawn from generators seeded by (seed, step), so a run is a pure function of its seed and a resumed run
repeats an uninterrupted one exactly.

The loss of a batch is the mean over its counted targets (patches after the prefix). With W ranks each
rank's loss is reweighted by W * (its targets) / (all targets), so the averaged gradient of DDP / FSDP is
the gradient of the global batch's mean: ``--batch-size`` is global and a 2-process run takes the same steps
as a 1-process run.

Stops on purpose (errors.py): a preemption signal (checkpoint, then exit 75), too many unreadable samples,
a NaN loss, a checkpoint that does not fit the run. A resumed run that has nothing left to train only does
what was asked (the probe) and keeps the summary of the training.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Optional

import numpy as np
import torch

from ..ops.pixel_loss import target_count
from . import checkpoint as ckpt
from . import init_from, resume
from .args import run_options
from .bad_samples import BadSamples
from .data import make_stream, mix_seed
from .distributed import DistEnv, all_reduce_sum, barrier, gather_objects, setup, teardown, wrap
from .errors import BadDataError, DivergedError, Preempted, ResumeError
from .model import build_model, enable_activation_checkpointing
from .preemption import PreemptionGuard
from .schedule import build_optimizer, build_scheduler, describe, set_step

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_prefix(model, step: int, seed: int, global_batch: int, env: DistEnv):
    """AIM's prefix for this rank's rows of the global batch at ``step`` (None when the model has no prefix
    sampling), with the number of counted targets of this rank and of the global batch."""
    cfg = model.config
    n, offset = cfg.num_patches, cfg.block_size
    local = global_batch // env.world
    rows = slice(env.rank * local, (env.rank + 1) * local)
    prefix = None
    if cfg.prefix and cfg.is_causal:
        gen = torch.Generator().manual_seed(mix_seed(seed, step, 4))
        prefix = model.sample_prefix_len(global_batch, device="cpu", generator=gen)
    counted = target_count(global_batch, n, offset, prefix)
    local_prefix = prefix[rows].to(env.device, non_blocking=True) if prefix is not None else None
    return local_prefix, int(counted[rows].sum()), int(counted.sum())


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


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="pretrain")


def _say(msg: str, env: DistEnv, bar=None) -> None:
    if env.is_main:
        (bar.write if bar is not None else print)(msg, flush=True)


def save_checkpoint(core, optimizer, scheduler, *, step: int, samples_seen: int, args, env: DistEnv,
                    bad: BadSamples, enforce_bad_bound: bool = True) -> tuple:
    """Collective: gather the full state and every rank's RNGs; rank 0 writes OUT/checkpoint-STEP.pt atomically
    (keeping the last --keep). Returns (the full model state dict, the path); on other ranks the state dict
    may be empty (FSDP) and the path is None."""
    bad.sync(env, lambda m: _say(m, env), step, enforce_bad_bound)  # the checkpoint holds every failure so far
    model_sd, optim_sd = ckpt.model_and_optimizer_state(core, optimizer)
    rngs = gather_objects(ckpt.capture_rng(), env)
    path = None
    if env.is_main:
        path = ckpt.save_step({
            "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
            "samples_seen": samples_seen, "rng": rngs, "world_size": env.world, "config": core.config.to_dict(),
            "args": run_options(args), "bad_samples": bad.state_dict(),
        }, args.out, args.keep)
    return model_sd, path


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


def _load_resume_state(args, env: DistEnv) -> Optional[dict]:
    """The checkpoint --resume continues (None: start from scratch), after checking it fits this run."""
    if not args.resume:
        return None
    state, path = ckpt.load_latest(args.out, warn=lambda m: _say(m, env))
    if state is None:
        _say(f"--resume: no checkpoint in {args.out} yet, starting from scratch", env)
        return None
    diffs = resume.differences(state["args"], run_options(args), state["args"])
    if diffs:
        raise ResumeError(f"{path} was written by a run with other options: {'; '.join(diffs)}")
    if args.steps < state["step"]:
        raise ResumeError(f"--steps {args.steps} is below the step of {path} ({state['step']}); a run cannot "
                          "be shortened behind its checkpoint")
    state["path"] = path
    _say(f"resuming from {path} at step {state['step']}", env)
    barrier(env)  # every rank has read its checkpoint before rank 0 renames the ones it fell back past
    if env.is_main:
        for moved in ckpt.set_aside_newer(args.out, state["step"]):
            _say(f"kept the unreadable checkpoint as {moved}", env)
    return state


def _load_into(core, optimizer, state: dict) -> None:
    """The checkpoint's model and optimizer state, or a ResumeError saying why it does not fit."""
    cfg = core.config.to_dict()
    saved = state.get("config", cfg)
    diffs = [f"{k} {cfg[k]} (checkpoint: {saved[k]})" for k in cfg if k in saved and saved[k] != cfg[k]]
    if diffs:
        raise ResumeError(f"{state['path']} holds another model: {'; '.join(diffs)}")
    try:
        ckpt.load_model_and_optimizer_state(core, optimizer, state["model"], state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ResumeError(f"{state['path']} does not fit this model: {str(e).splitlines()[0]}") from None


def _schedule_banner(args, state: Optional[dict], start_step: int) -> str:
    text = describe(start_step, total=args.steps, warmup=args.warmup_steps, lr=args.lr, min_lr=args.min_lr)
    old_steps = state["args"].get("steps") if state is not None else None
    if old_steps is not None and old_steps != args.steps:
        old_lr = state["scheduler"]["_last_lr"][0]
        text = f"schedule re-planned for --steps {args.steps} (was {old_steps}, where step {start_step}'s lr was " \
               f"{old_lr:.3g}): {text}"
    return text


def _train(args, env: DistEnv, guard: PreemptionGuard) -> dict:
    t_start = time.perf_counter()
    if args.batch_size % env.world:  # parse_args checked WORLD_SIZE; this guards other launchers
        raise ResumeError(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({env.world})")
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
    state = _load_resume_state(args, env)
    if env.is_main:
        resume.write_options(args.out, run_options(args))  # what a later --resume continues

    # ---- model (identical initialization on every rank), tokenizer, optimizer, schedule ----------------
    seed_everything(args.seed)
    vocab_size, tok = args.vocab_size, None
    if args.objective == "token":
        from .tokens import prepare_tokenizer, tokenizer_vocab_size

        geometry = build_model(args.preset, img_size=args.img_size).config  # patch and image sizes
        vocab_size = vocab_size or geometry.vocab_size
        tok = prepare_tokenizer(
            path=args.tokenizer, out_dir=args.out, resume=state is not None, vocab_size=vocab_size,
            patch_size=geometry.patch_size, fit_images=args.tokenizer_images, env=env,
            progress=not args.no_progress,
            fit_batches=make_stream(args.data, img_size=geometry.img_size, in_chans=geometry.in_chans,
                                    global_batch=args.batch_size, rank=0, world=1, seed=args.seed, start=0,
                                    device=env.device, workers=args.workers, decode=args.decode),
        )
        vocab_size = tokenizer_vocab_size(tok, vocab_size)
        seed_everything(args.seed)  # fitting may draw random numbers: initialize as a pixel run would
    core = build_model(args.preset, img_size=args.img_size, objective=args.objective, vocab_size=vocab_size,
                       backend=args.backend).to(env.device)
    if state is None:
        init_from.apply(core, args, lambda m: _say(m, env))  # issue 18: --init CKPT (a new run only)
    cfg = core.config
    if args.checkpointing:
        enable_activation_checkpointing(core)
    model = wrap(core, env, args.fsdp)
    optimizer = build_optimizer(core, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, total=args.steps, warmup=args.warmup_steps, lr=args.lr, min_lr=args.min_lr)
    torch.manual_seed(mix_seed(args.seed, env.rank, 3))  # distinct per-rank streams from here on

    start_step, samples_seen = 0, 0
    bad = BadSamples(args.max_bad_samples, None)
    if state is not None:
        _load_into(core, optimizer, state)
        start_step, samples_seen = state["step"], state["samples_seen"]
        # The schedule is this run's (an extended --steps re-plans it), not the checkpoint's: its state would
        # bring back the old total. At the same --steps both give the same learning rates, bit for bit.
        set_step(scheduler, start_step)
        bad.load_state_dict(state.get("bad_samples"))
        if state["world_size"] == env.world:
            ckpt.restore_rng(state["rng"][env.rank])
        else:
            _say(f"note: checkpoint written by {state['world_size']} processes, resumed on {env.world}: "
                 "RNG states are reseeded", env)
    schedule_text = _schedule_banner(args, state, start_step)
    state = None  # free the checkpoint's tensors before training

    step_fn = torch.compile(model, backend=args.compile_backend) if args.compile else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if env.device.type == "cuda" and args.precision == "bf16" else contextlib.nullcontext()
    )
    stop = min(args.steps, args.stop_at or args.steps)
    source = make_stream(args.data, img_size=cfg.img_size, in_chans=cfg.in_chans, global_batch=args.batch_size,
                         rank=env.rank, world=env.world, seed=args.seed, start=samples_seen, device=env.device,
                         workers=args.workers, decode=args.decode)
    bad.num_files = getattr(source, "num_files", None)
    take_bad = getattr(source, "take_bad", list)
    stream = iter(source)
    metrics = MetricsLog(args.out, start_step, env.is_main)
    n_params = core.num_parameters()  # DTensor.numel() is the global size, so FSDP counts right too
    _say(f"aimkern.train: {args.preset} ({n_params / 1e6:.2f}M params, {cfg.num_patches} patches of "
         f"{cfg.patch_size}px at {cfg.img_size}px), data={args.data}, objective={args.objective}, "
         f"{env.world} process(es) on {env.device.type}{' (FSDP2)' if args.fsdp and env.distributed else ''}, "
         f"global batch {args.batch_size}, steps {start_step}->{stop} of {args.steps}\n  {schedule_text}", env)

    # ---- the loop ----------------------------------------------------------------------------------
    bar = _progress(stop, start_step, env.is_main and not args.no_progress and start_step < stop)
    say = lambda m: _say(m, env, bar)  # noqa: E731
    losses, throughput = [], []
    acc_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    acc_count, last_t, last_step, model_sd, saved_at = 0, time.perf_counter(), start_step, None, None
    for step in range(start_step, stop):
        images = next(stream)
        bad.add(take_bad())
        prefix, count_local, count_global = step_prefix(core, step, args.seed, args.batch_size, env)
        targets = None
        if tok is not None:
            from .tokens import encode

            targets = encode(tok, images)
        lr = scheduler.get_last_lr()[0]
        with autocast:
            loss = step_fn(images, prefix_len=prefix, targets=targets)
        (loss * (env.world * count_local / count_global)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += args.batch_size
        acc_loss += loss.detach().double() * count_local
        acc_count += count_local
        done = step + 1
        preempted = done < stop and guard.should_stop(env)  # collective: every rank stops after the same step
        if done % args.log_every == 0 or done == stop or preempted:
            totals = all_reduce_sum(torch.stack([acc_loss, acc_loss.new_tensor(float(acc_count))]), env)
            mean_loss = (totals[0] / totals[1]).item()
            if not np.isfinite(mean_loss):
                raise DivergedError(f"the loss is {mean_loss} at step {done} (lr {lr:.3g}); lower --lr or check "
                                    "the data, then --resume from the last checkpoint")
            try:
                bad.sync(env, say, done)
            except BadDataError as stop_error:  # keep the work done: fix the data or raise the bound, --resume
                _, saved_at = save_checkpoint(core, optimizer, scheduler, step=done, samples_seen=samples_seen,
                                              args=args, env=env, bad=bad, enforce_bad_bound=False)
                raise BadDataError(f"{stop_error} (checkpoint {saved_at or 'of step ' + str(done)} saved)") from None
            now = time.perf_counter()
            img_per_s = (done - last_step) * args.batch_size / (now - last_t)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record = {"step": done, "loss": mean_loss, "lr": lr, "img_per_s": img_per_s,
                      "grad_norm": float(grad_norm), "samples_seen": samples_seen,
                      "bad_samples": bad.reads, "bad_files": len(bad.paths), "elapsed_s": now - t_start}
            metrics.write(record)
            losses.append(mean_loss)
            throughput.append(((done - last_step) * args.batch_size, now - last_t))
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_per_s:.0f}", lr=f"{lr:.2e}")
            acc_loss.zero_()
            acc_count, last_t, last_step = 0, now, done
        if bar is not None:
            bar.update(1)
        if done == stop or preempted or (args.save_every and done % args.save_every == 0):
            model_sd, saved_at = save_checkpoint(core, optimizer, scheduler, step=done, samples_seen=samples_seen,
                                                 args=args, env=env, bad=bad)
        if preempted:
            if bar is not None:
                bar.close()
            stopped = Preempted(guard.signal_name, done, saved_at)
            _say(f"aimkern.train: {stopped}", env)
            raise stopped
    if bar is not None:
        bar.close()

    # ---- summary and probe -------------------------------------------------------------------------
    summary_path = os.path.join(args.out, SUMMARY_NAME)
    if not losses and os.path.isfile(summary_path):
        # Nothing trained now (a finished run resumed, e.g. for --probe): keep what the training reported.
        with open(summary_path) as f:
            summary = json.load(f)
        _say(f"nothing to train: the run is already at step {start_step} of {args.steps}", env)
    else:
        summary = {
            "preset": args.preset, "data": args.data, "objective": args.objective, "processes": env.world,
            "steps": stop, "of_steps": args.steps, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "img_per_s": _images_per_second(throughput),
            "params_m": n_params / 1e6, "out": args.out,
        }
        summary["wall_s"] = time.perf_counter() - t_start
    summary["bad_samples"], summary["bad_files"] = bad.reads, sorted(bad.paths)
    if args.probe:
        summary.update(_probe(args, env, model_sd))
    if env.is_main:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
        _say(_format_summary(summary), env)
    return summary


def _images_per_second(intervals: list) -> Optional[float]:
    """Images / s over the logged (images, seconds) intervals; the first one includes warm-up (and
    compilation), so it is left out when there are others."""
    kept = intervals[1:] if len(intervals) > 1 else intervals
    return sum(i for i, _ in kept) / sum(s for _, s in kept) if kept else None


def _probe(args, env: DistEnv, model_sd: Optional[dict]) -> dict:
    """Rank 0: aimkern.eval's probes of the trained model beside a random-init one (plain copies, so FSDP is fine)."""
    from .probe import compare

    if not env.is_main:
        return {}
    if model_sd is None:  # nothing trained in this invocation: the checkpoint holds the model
        state, _ = ckpt.load_latest(args.out, warn=lambda m: _say(m, env))
        if state is None:
            raise ResumeError(f"--probe: {args.out} holds no checkpoint to probe")
        model_sd = state["model"]
    vocab = model_sd["head.out.weight"].shape[0] if args.objective == "token" else None
    kwargs = dict(img_size=args.img_size, objective=args.objective, vocab_size=vocab, backend=args.backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the very initialization the run started from
        random_init = build_model(args.preset, **kwargs).to(env.device)
    trained = build_model(args.preset, **kwargs)
    trained.load_state_dict(model_sd)
    t0 = time.perf_counter()
    result = compare(trained.to(env.device), random_init, env.device)
    result["probe_s"] = time.perf_counter() - t0
    return result


def _format_summary(s: dict) -> str:
    lines = [
        f"nothing to train: the run is already at step {s['steps']} of {s['of_steps']}"
        if s["final_loss"] is None else
        f"done: {s['steps']}/{s['of_steps']} steps in {s['wall_s']:.1f}s, loss {s['first_loss']:.4f} -> "
        f"{s['final_loss']:.4f}, {s['img_per_s']:.0f} img/s ({s['processes']} process(es))",
    ]
    if "probe" in s:
        from ..eval.report import format_table

        lines.append(f"probes on digits (test accuracy, as python -m aimkern.eval):\n{format_table(s['probe'])}")
    if s.get("bad_samples"):
        lines.append(f"skipped {s['bad_samples']} unreadable sample(s) from {len(s['bad_files'])} file(s) (listed in "
                     f"{SUMMARY_NAME})")
    lines.append(f"outputs: {s['out']}/ ({METRICS_NAME}, {ckpt.CHECKPOINT_NAME}, {SUMMARY_NAME})")
    return "\n".join(lines)
