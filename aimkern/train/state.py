"""A run's checkpoint as a whole: what ``--resume`` continues from, and the collective save.

``checkpoint.py`` reads and writes files; this module decides what goes in (model, optimizer, scheduler,
step, data position, bad samples, every rank's RNG states and loss window) and how a resumed run is put
back: the options checked against the run's, the model's config against the checkpoint's, the schedule
re-planned for this run's ``--steps``.
"""
from __future__ import annotations

from typing import Callable, Optional

from .. import dispatch
from ..distributed import DistEnv, barrier, gather_objects
from ..models.config import current_names
from . import checkpoint as ckpt
from . import resume
from .config import run_options
from .bad_samples import BadSamples
from .errors import ResumeError
from .metering import LogWindow
from .schedule import describe, set_step
from .step import Run


def save_checkpoint(run: Run, *, step: int, samples_seen: int, bad: BadSamples, window: LogWindow,
                    say: Callable[[str], None], data: Optional[dict] = None) -> tuple:
    """Collective: gather the full state, every rank's RNGs, loss window and ``data`` (a --native rank's packer
    position, ``data_state`` in the file); rank 0 writes
    OUT/checkpoint-STEP.pt atomically (keeping the last --keep). Returns (the full model state dict, the path);
    on other ranks the state dict may be empty (FSDP) and the path is None."""
    bad.sync(run.env, say, step)  # the checkpoint holds every failure so far
    model_sd, optim_sd = ckpt.model_and_optimizer_state(run.core, run.optimizer)
    ranks = gather_objects({"rng": ckpt.capture_rng(), "window": window.state(), "data": data}, run.env)
    path = None
    if run.env.is_main:
        choices = dispatch.choices()  # the paths (and autotuned configs) the run took: --resume pins them
        resume.write_dispatch(run.args.out, choices)
        path = ckpt.save_step({
            "model": model_sd, "optimizer": optim_sd, "scheduler": run.scheduler.state_dict(), "step": step,
            "samples_seen": samples_seen, "rng": [r["rng"] for r in ranks], "world_size": run.env.world,
            "log_window": [r["window"] for r in ranks], "config": run.core.config.to_dict(),
            "args": run_options(run.args), "bad_samples": bad.state_dict(), "dispatch": choices,
            "data_state": [r["data"] for r in ranks],
        }, run.args.out, run.args.keep)
    return model_sd, path


def load_resume_state(args, env: DistEnv, say: Callable[[str], None]) -> Optional[dict]:
    """The checkpoint --resume continues (None: start from scratch), after checking it fits this run."""
    if not args.resume:
        return None
    state, path = ckpt.load_latest(args.out, warn=say)
    if state is None:
        say(f"--resume: no checkpoint in {args.out} yet, starting from scratch")
        return None
    diffs = resume.differences(state["args"], run_options(args), state["args"])
    if diffs:
        raise ResumeError(f"{path} was written by a run with other options: {'; '.join(diffs)}")
    if args.steps < state["step"]:
        raise ResumeError(f"--steps {args.steps} is below the step of {path} ({state['step']}); a run cannot "
                          "be shortened behind its checkpoint")
    state["path"] = path
    say(f"resuming from {path} at step {state['step']}")
    recorded = state.get("dispatch")  # absent in checkpoints written before measured dispatch
    if recorded:
        dispatch.pin(recorded)
        fixed = sum(len(v.get("configs", [])) for v in recorded.values() if isinstance(v, dict))
        say(f"dispatch: reusing the {len(recorded)} path(s) the run chose (" +
            ", ".join(f"{k.split('|')[0]}: {dispatch.chosen_name(v)}" for k, v in sorted(recorded.items())) + ")" +
            (f" and the {fixed} autotuned kernel config(s) it fixed" if fixed else ""))
    barrier(env)  # every rank has read its checkpoint before rank 0 renames the ones it fell back past
    if env.is_main:
        for moved in ckpt.set_aside_newer(args.out, state["step"]):
            say(f"kept the unreadable checkpoint as {moved}")
    return state


def _load_into(run: Run, state: dict) -> None:
    """The checkpoint's model and optimizer state, or a ResumeError saying why it does not fit."""
    cfg = run.core.config.to_dict()
    saved = current_names(state.get("config", cfg), "the checkpoint's config")  # older ones say head_dim
    diffs = [f"{k} {cfg[k]} (checkpoint: {saved[k]})" for k in cfg if k in saved and saved[k] != cfg[k]]
    if diffs:
        raise ResumeError(f"{state['path']} holds another model: {'; '.join(diffs)}")
    try:
        ckpt.load_model_and_optimizer_state(run.core, run.optimizer, state["model"], state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ResumeError(f"{state['path']} does not fit this model: {str(e).splitlines()[0]}") from None


def restore(run: Run, state: dict, bad: BadSamples, window: LogWindow, say: Callable[[str], None]) -> tuple:
    """Put ``run`` where ``state`` left off; returns (step, samples seen)."""
    _load_into(run, state)
    step = state["step"]
    # The schedule is this run's (an extended --steps re-plans it), not the checkpoint's: its state would
    # bring back the old total. At the same --steps both give the same learning rates, bit for bit.
    set_step(run.scheduler, step)
    bad.load_state_dict(state.get("bad_samples"))
    same_world = state["world_size"] == run.env.world
    window.load(state.get("log_window"), run.env.rank, same_world)
    if same_world:
        ckpt.restore_rng(state["rng"][run.env.rank])
    else:
        say(f"note: checkpoint written by {state['world_size']} processes, resumed on {run.env.world}: "
            "RNG states are reseeded")
    return step, state["samples_seen"]


def schedule_banner(args, state: Optional[dict], start_step: int) -> str:
    """What the learning rate does from ``start_step`` on, and whether a longer --steps re-planned it."""
    text = describe(start_step, total=args.steps, warmup=args.warmup_steps, lr=args.lr, min_lr=args.min_lr)
    old_steps = state["args"].get("steps") if state is not None else None
    if old_steps is not None and old_steps != args.steps:
        old_lr = state["scheduler"]["_last_lr"][0]
        text = f"schedule re-planned for --steps {args.steps} (was {old_steps}, where step {start_step}'s lr was " \
               f"{old_lr:.3g}): {text}"
    return text
