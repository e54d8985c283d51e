"""Setting a training run up: the run directory, the resumed state, the tokenizer, the step, the data.

``open_session`` does everything before the first step, in an order that keeps a resumed run exact: the
checkpoint is read and checked, the options written, the tokenizer loaded or fitted, the model initialized
from the seed (``step.build_run``), the checkpoint's state and RNGs restored, and the stream opened at the
checkpoint's data position.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

from ..data.inputs import ModelInputs
from ..data.sources import BatchStream, make_stream
from ..distributed import DistEnv
from . import init_from, resume
from .config import run_options
from .bad_samples import BadSamples
from .errors import ResumeError
from .metering import Console, LogWindow, MetricsLog
from .model import model_config
from .state import load_resume_state, restore, schedule_banner
from .step import Run, build_run, seed_everything


@dataclass
class Session:
    """A run being trained: the step's pieces (``run``), where it starts and stops, and what it reports."""

    run: Run
    start_step: int
    stop: int
    samples_seen: int
    source: BatchStream
    batches: Iterator
    bad: BadSamples
    window: LogWindow
    metrics: MetricsLog
    console: Console
    t_start: float
    native: bool = False  # --native: batches are packs (aimkern.train.native)
    window_images: int = 0  # --native: images of all ranks since the last log line (the img/s field)


def _stream(args, env: DistEnv, cfg, *, start: int, rank: int, world: int) -> BatchStream:
    return make_stream(args.data, img_size=cfg.img_size, in_chans=cfg.in_chans, global_batch=args.batch_size,
                       rank=rank, world=world, seed=args.seed, start=start, device=env.device,
                       workers=args.workers, decode=args.decode)


def _tokenizer(args, env: DistEnv, resumed: bool):
    """The token objective's tokenizer (loaded, or fitted on the first training images); None for pixels."""
    if args.objective != "token":
        return None
    from .tokens import prepare_tokenizer

    seed_everything(args.seed)
    geometry = model_config(args.preset, img_size=args.img_size)  # patch and image sizes: read, no model built
    return prepare_tokenizer(
        path=args.tokenizer, out_dir=args.out, resume=resumed, vocab_size=args.vocab_size or geometry.vocab_size,
        patch_size=geometry.patch_size, fit_images=args.tokenizer_images, env=env, progress=not args.no_progress,
        # The model's input: the uint8 image batches normalized as the step normalizes them.
        fit_batches=ModelInputs(_stream(args, env, geometry, start=0, rank=0, world=1), geometry.in_chans),
    )


def open_session(args, env: DistEnv) -> Session:
    """Everything before the first step (see the module docstring); prints the run's banner."""
    t_start, console = time.perf_counter(), Console(env)
    if args.batch_size % env.world:  # parse_args checked WORLD_SIZE; this guards other launchers
        raise ResumeError(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({env.world})")
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
    state = load_resume_state(args, env, console.say)
    if env.is_main:
        resume.write_options(args.out, run_options(args))  # what a later --resume continues
    init = (lambda core: init_from.apply(core, args, console.say)) if state is None else None  # --init: new runs
    run = build_run(args, env, tokenizer=_tokenizer(args, env, resumed=state is not None), before_wrap=init)
    bad, window = BadSamples(args.max_bad_samples), LogWindow(env.device, 0)
    start_step, samples_seen = restore(run, state, bad, window, console.say) if state is not None else (0, 0)
    window.timed_from = start_step
    banner = schedule_banner(args, state, start_step)
    data_state = _native_state(args, env, state)
    state = None  # free the checkpoint's tensors before training
    stop = min(args.steps, args.stop_at or args.steps)
    if args.native:
        from .native import native_stream

        source = native_stream(args, env, run.core.config, first_step=start_step, state=data_state)
    else:
        source = _stream(args, env, run.core.config, start=samples_seen, rank=env.rank, world=env.world)
    bad.num_samples = source.num_samples
    console.say(_banner(args, run, start_step, stop, banner))
    console.progress(stop, start_step, not args.no_progress and start_step < stop)
    return Session(run=run, start_step=start_step, stop=stop, samples_seen=samples_seen, source=source,
                   batches=iter(source), bad=bad, window=window, metrics=MetricsLog(args.out, start_step, env.is_main),
                   console=console, t_start=t_start, native=args.native)


def _native_state(args, env: DistEnv, state):
    """--native: this rank's packer position from the checkpoint (None from scratch); a ResumeError when the
    checkpoint was written by another number of processes (each rank packs its own positions)."""
    if not args.native or state is None:
        return None
    if state["world_size"] != env.world:
        raise ResumeError(f"{state['path']} was written by {state['world_size']} process(es); a --native run "
                          f"resumes on as many (each rank packs its own images), not {env.world}")
    return state["data_state"][env.rank]


def _banner(args, run: Run, start_step: int, stop: int, schedule: str) -> str:
    cfg, env = run.core.config, run.env
    n_params = run.core.num_parameters()  # DTensor.numel() is the global size, so FSDP counts right too
    sharding = " (FSDP2)" if args.fsdp and env.distributed else ""
    return (f"aimkern.train: {args.preset} ({n_params / 1e6:.2f}M params, {cfg.num_patches} patches of "
            f"{cfg.patch_size}px at {cfg.img_size}px), data={args.data}, objective={args.objective}, "
            f"{env.world} process(es) on {env.device.type}{sharding}, "
            f"{'packs of images at native size' if args.native else f'global batch {args.batch_size}'}, "
            f"steps {start_step}->{stop} of {args.steps}\n  {schedule}" + (
                f"\n  native resolution: up to {args.max_patches} patches an image, {args.tokens_per_batch} tokens "
                "a step per process; positions: " + (
                    "2-D sin-cos of each image's grid" if cfg.pos_embed == "sincos" else
                    f"the learned {cfg.grid_size} x {cfg.grid_size} table, bilinearly resized to each image's grid")
                if args.native else ""))
