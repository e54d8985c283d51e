"""The end of a run: ``OUT/summary.json``, the closing lines, and ``--probe``."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from . import checkpoint as ckpt
from .errors import ResumeError
from .metering import METRICS_NAME
from .model import build_model

SUMMARY_NAME = "summary.json"


def images_per_second(intervals: list) -> Optional[float]:
    """Images / s over the logged (images, seconds) intervals; the first one includes warm-up (and
    compilation), so it is left out when there are others."""
    kept = intervals[1:] if len(intervals) > 1 else intervals
    return sum(i for i, _ in kept) / sum(s for _, s in kept) if kept else None


def build_summary(args, session, losses: list, intervals: list, say) -> dict:
    """This invocation's summary; a run with nothing left to train keeps the summary of its training."""
    path = os.path.join(args.out, SUMMARY_NAME)
    if session.start_step >= session.stop and os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
        say(f"nothing to train: the run is already at step {session.start_step} of {args.steps}")
    else:
        summary = {
            "preset": args.preset, "data": args.data, "objective": args.objective, "processes": session.run.env.world,
            "steps": session.stop, "of_steps": args.steps, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None, "img_per_s": images_per_second(intervals),
            "params_m": session.run.core.num_parameters() / 1e6, "out": args.out,
            "wall_s": time.perf_counter() - session.t_start,
        }
    summary["bad_samples"], summary["bad_files"] = session.bad.reads, session.bad.records()
    if getattr(session, "native", False) and session.source.tokens_total:
        src = session.source  # this rank's packs of this invocation
        summary["native"] = {"tokens_per_step": args.tokens_per_batch, "max_patches": args.max_patches,
                             "steps_packed": src.tokens_total // args.tokens_per_batch,
                             "padding_fraction": src.tokens_padding / src.tokens_total}
    return summary


def write_summary(args, summary: dict, env) -> None:
    if env.is_main:
        with open(os.path.join(args.out, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=1)


def format_summary(s: dict) -> str:
    if s.get("final_loss") is not None:
        head = (f"done: {s['steps']}/{s['of_steps']} steps in {s['wall_s']:.1f}s, loss {s['first_loss']:.4f} -> "
                f"{s['final_loss']:.4f}, {s['img_per_s']:.0f} img/s ({s['processes']} process(es))")
    elif "wall_s" in s and s["steps"] < s["of_steps"]:
        head = f"stopped at step {s['steps']} of {s['of_steps']} (no log step in this invocation); --resume continues"
    else:
        head = f"nothing to train: the run is already at step {s['steps']} of {s['of_steps']}"
    lines = [head]
    if "probe" in s:
        from ..eval.report import format_table

        lines.append(f"probes on digits (test accuracy, as python -m aimkern.eval):\n{format_table(s['probe'])}")
    if s.get("native"):
        n = s["native"]
        lines.append(f"native packing: {100 * n['padding_fraction']:.1f}% of the {n['tokens_per_step']} tokens a step "
                     f"were padding (rank 0, {n['steps_packed']} step(s) of this invocation), the rest image patches")
    if s.get("bad_samples"):
        lines.append(f"skipped {s['bad_samples']} unreadable read(s) of {len(s['bad_files'])} sample(s) (listed in "
                     f"{SUMMARY_NAME})")
    lines.append(f"outputs: {s['out']}/ ({METRICS_NAME}, {ckpt.CHECKPOINT_NAME}, {SUMMARY_NAME})")
    return "\n".join(lines)


def probe(args, env, model_sd: Optional[dict], say) -> dict:
    """Rank 0: aimkern.eval's probes of the trained model beside a random-init one (plain copies, so FSDP is fine)."""
    from .probe import compare

    if not env.is_main:
        return {}
    if model_sd is None:  # nothing trained in this invocation: the checkpoint holds the model
        state, _ = ckpt.load_latest(args.out, warn=say)
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
