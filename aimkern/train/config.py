"""The trainer's options in one typed place: ``TrainConfig``, one field per option of ``python -m aimkern.train``.

A field carries the option's default, its command-line type and choices, its ``--help`` text, its group in
``--help`` and its resume rule. Everything else is generated from the fields: the argparse parser
(``args.build_parser``), what ``OUT/run.json`` and every checkpoint record (``run_options``), the sets of
options ``--resume`` lets change (``resume``), and the sentence that lists them in ``--help``'s epilog and in
the README (``resume_rules``; tests/test_train_config.py checks the README's copy). A new option is one
field here.

Resume rules (what ``--resume`` does with an option of the command line):
- ``REFUSED``: the option defines what a step computes (model, data, optimization, seed); a value that
  differs from the run's is refused, with every difference listed; not given, the run's value is used.
- ``KEPT``: how or how long the run executes; it may change, and when not given again it keeps the run's
  value (a bare --resume must not quietly save less often or take another bad-data bound).
- ``PER_INVOCATION``: a switch of one invocation; it may change, and when not given it takes its default,
  so an earlier invocation's --stop-at or --probe never sticks.

Standard library only (and the model presets, which are torch-free): ``--help`` must not import torch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from ..backends import BACKENDS
from ..models.config import PRESETS

REFUSED, KEPT, PER_INVOCATION = "refused if changed", "kept", "per invocation"
RULES = (REFUSED, KEPT, PER_INVOCATION)
# The --help groups, in the order --help shows them.
DATA, OPTIM, EXEC, OUTPUT = "model and data", "optimization (AIM's recipe)", "execution", "output"
# Options that name the run being resumed rather than describe it: left out of the resume rules' sentence.
_NAMES_THE_RUN = ("out", "resume")

MAX_LR = 1.0  # the divergence guard: AdamW above this diverges at once (AIM's recipe uses 1e-3 .. 2e-3)


def option(default, help: str, *, group: str, resume: str = REFUSED, type=None, choices=None, metavar=None,
           cli: bool = True):
    """A TrainConfig field: ``default``, its ``--help`` text and group, its resume rule (REFUSED / KEPT /
    PER_INVOCATION), the argparse ``type`` / ``choices`` / ``metavar``; a bool defaulting to False is a
    switch (``store_true``). ``cli=False``: recorded in run.json, but set by ``parse_args``, not a flag."""
    if resume not in RULES:
        raise ValueError(f"resume must be one of {RULES}, got {resume!r}")
    meta = dict(help=help, group=group, resume=resume, type=type, choices=choices, metavar=metavar, cli=cli)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    """The options of one ``python -m aimkern.train`` run (``parse_args`` returns one). Field order is
    ``--help``'s order and run.json's."""

    # model and data: --preset, --data and how it is read, the objective and its tokenizer, the op backend
    preset: str = option("vit-tiny", "model preset (default: vit-tiny)", group=DATA, choices=sorted(PRESETS))
    data: str = option(
        "digits", "'digits' (scikit-learn's 8x8 digits, upsampled; nothing is downloaded), 'synthetic' (random "
        "images, for throughput), the path of an ImageFolder tree (class sub-folders of images), or WebDataset "
        "shards: a brace pattern ('shards/train-{000000..000127}.tar'), a directory of .tar files, or a "
        "shard-list (.txt) / index (.json) file, see python -m aimkern.data (default: digits)", group=DATA)
    decode: str = option(
        "cpu", "shards: decode JPEGs in the DataLoader workers with PIL (draft mode), or in batches on the "
        "GPU with nvJPEG (needs CUDA) (default: cpu)", group=DATA, choices=("cpu", "gpu"))
    img_size: Optional[int] = option(None, "image size in pixels (default: the preset's)", group=DATA,
                                     type=positive_int)
    workers: int = option(
        min(8, os.cpu_count() or 1), "DataLoader worker processes per rank for an ImageFolder or shards "
        "(default: min(8, CPUs))", group=DATA, resume=KEPT, type=non_negative_int)
    objective: str = option(
        "pixel", "'pixel': normalized next-patch pixels; 'token': next patch's k-means token id "
        "(default: pixel)", group=DATA, choices=("pixel", "token"))
    tokenizer: Optional[str] = option(
        None, "token objective: a saved KMeansPatchTokenizer to load (default: fit one on the training "
        "data and save it as OUT/tokenizer.pt)", group=DATA)
    vocab_size: Optional[int] = option(
        None, "token objective: vocabulary of a tokenizer fitted on the fly (default: the preset's, 8192)",
        group=DATA, type=positive_int)
    tokenizer_images: int = option(
        4096, "token objective: how many training images a tokenizer fitted on the fly clusters "
        "(default: 4096)", group=DATA, type=positive_int)
    max_bad_samples: float = option(
        0.001, "an ImageFolder or shards: a sample that fails to decode is replaced by a seeded draw (so "
        "resume stays exact), reported on stderr and counted in metrics.jsonl / summary.json; stop when "
        "more samples than this are bad: a count when >= 1, else a fraction of the dataset (default: "
        "0.001, 1 in 1000)", group=DATA, resume=KEPT, type=non_negative_float)
    backend: str = option(
        "auto", "aimkern op backend: 'auto' (default) measures each op's candidates on first use and runs "
        "the fastest correct one (aimkern.dispatch; AIMKERN_DISPATCH=fixed: Triton on CUDA, the "
        "reference on CPU); 'triton' or 'reference' force a path", group=DATA, resume=KEPT, choices=BACKENDS)

    native: bool = option(
        False, "native resolution (an ImageFolder or shards --data): each image at its own aspect ratio, resized to at "
        "most --max-patches patches, packed first fit into --tokens-per-batch tokens a step (no padding inside "
        "an image; the unused tail is padding with no loss); --batch-size then only sets the default "
        "--tokens-per-batch", group=DATA)
    max_patches: Optional[int] = option(
        None, "--native: the most patches an image's grid may have (default: the preset's, e.g. 196 for "
        "224 px / 16)", group=DATA, type=positive_int)
    tokens_per_batch: Optional[int] = option(
        None, "--native: tokens per step PER RANK, fixed, so every step has the same shapes (default: "
        "--batch-size / processes x --max-patches)", group=DATA, type=positive_int)

    # optimization, AIM's recipe: batch, steps, learning rate and schedule, weight decay, clipping, seed, precision
    batch_size: int = option(64, "GLOBAL batch size, over all ranks (default: 64)", group=OPTIM, type=positive_int)
    steps: int = option(300, "optimizer steps in the schedule (default: 300)", group=OPTIM, resume=KEPT,
                        type=positive_int)
    lr: float = option(2e-3, f"peak learning rate, at most {MAX_LR} (default: 2e-3)", group=OPTIM,
                       type=positive_float)
    min_lr: float = option(0.0, "learning rate at the end of the cosine (default: 0)", group=OPTIM,
                           type=non_negative_float)
    warmup_steps: Optional[int] = option(None, "linear warmup steps (default: 10%% of --steps)", group=OPTIM,
                                         type=non_negative_int)
    weight_decay: float = option(
        0.05, "AdamW weight decay on matrices; biases, norms and positions get none (default: 0.05)", group=OPTIM,
        type=non_negative_float)
    grad_clip: float = option(1.0, "clip the global gradient norm; 0 disables (default: 1.0)", group=OPTIM,
                              type=non_negative_float)
    seed: int = option(0, "seed of the initialization, data order and prefixes (default: 0)", group=OPTIM, type=int)
    precision: str = option("bf16", "bf16 autocast on CUDA (default), or fp32; the CPU always runs fp32",
                            group=OPTIM, choices=("bf16", "fp32"))

    # execution: where and how the steps run (device, threads, torch.compile, activation checkpointing, FSDP2)
    device: Optional[str] = option(
        None, "'cuda' or 'cpu' (default: cuda when available; under torchrun cuda:LOCAL_RANK)", group=EXEC,
        resume=KEPT)
    threads: Optional[int] = option(
        None, "CPU intra-op threads (default: $OMP_NUM_THREADS if set, else 1: the CPU toy's ops are too "
        "small to gain from more, and extra threads stall when the cores are shared)", group=EXEC, resume=KEPT,
        type=positive_int)
    compile: bool = option(False, "torch.compile the model", group=EXEC, resume=PER_INVOCATION)
    compile_backend: str = option(
        "inductor", "torch.compile backend with --compile (default: inductor; 'aot_eager' traces without codegen)",
        group=EXEC, resume=KEPT)
    checkpointing: bool = option(
        False, "activation checkpointing: recompute each transformer block in the backward (less memory)",
        group=EXEC, resume=PER_INVOCATION)
    fsdp: bool = option(
        False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) "
        "instead of DistributedDataParallel; for the big presets", group=EXEC, resume=PER_INVOCATION)

    # output: the run directory, --init, --resume, checkpoint cadence and count, logging, --stop-at, --probe
    out: Optional[str] = option(
        None, "run directory: run.json, metrics.jsonl, checkpoint-STEP.pt (checkpoint.pt links the "
        "latest), summary.json (default: runs/PRESET)", group=OUTPUT, resume=PER_INVOCATION)
    init: Optional[str] = option(  # issue 18: continue pretraining from released weights (init_from.py)
        None, "start from this checkpoint's trunk (ml-aim AIMv1/AIMv2, timm, transformers or aimkern "
        "layout; .pth/.pt/.bin/.safetensors) with a fresh head and optimizer; --preset defaults to "
        "the preset the checkpoint matches", group=OUTPUT, metavar="CKPT")
    resume: bool = option(
        False, "continue exactly from OUT's latest readable checkpoint (model, optimizer, data position, "
        "RNGs) with the run's own options (see 'resume' below)", group=OUTPUT, resume=PER_INVOCATION)
    keep: int = option(2, "checkpoints kept; a corrupt latest one falls back to the one before (default: 2)",
                       group=OUTPUT, resume=KEPT, type=positive_int)
    log_every: int = option(10, "steps between metrics.jsonl lines (default: 10)", group=OUTPUT, resume=KEPT,
                            type=positive_int)
    save_every: int = option(100, "steps between checkpoints; 0 saves only at the end (default: 100)",
                             group=OUTPUT, resume=KEPT, type=non_negative_int)
    stop_at: Optional[int] = option(
        None, "stop (after saving a checkpoint) at this step, as if preempted; the schedule still spans "
        "--steps, so a later --resume continues the same run (time-limited jobs)", group=OUTPUT,
        resume=PER_INVOCATION, type=positive_int)
    probe: bool = option(
        False, "after training: linear probe (logistic regression) on frozen, mean-pooled full-attention "
        "features of the digits train/test split, beside the same probe on a random-init model", group=OUTPUT,
        resume=PER_INVOCATION)
    no_progress: bool = option(
        False, "no tqdm progress bar (there is none either when stderr is not a terminal)", group=OUTPUT,
        resume=PER_INVOCATION)

    # set by parse_args, not a flag: the checksum of --init's file (a resume keeps the run's and loads its own
    # checkpoint, not the source again)
    init_sha256: Optional[str] = option(None, "sha256 of --init's file", group=OUTPUT, cli=False)


def flag(name: str) -> str:
    """The command-line flag of a field: ``max_bad_samples`` -> ``--max-bad-samples``."""
    return "--" + name.replace("_", "-")


def options(*rules: str) -> tuple:
    """The names of TrainConfig's fields, in order; only those with one of ``rules`` when given."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if not rules or f.metadata["resume"] in rules)


def groups() -> dict:
    """{--help group title: [its command-line fields, in order]}, groups in order of first appearance."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["cli"]:
            out.setdefault(f.metadata["group"], []).append(f)
    return out


def argparse_kwargs(f: dataclasses.Field) -> dict:
    """``add_argument`` keywords of one field: a False bool is a switch, anything else takes a value."""
    meta = f.metadata
    if f.default is False:
        return dict(action="store_true", help=meta["help"])
    kwargs = dict(default=f.default, help=meta["help"])
    kwargs.update({k: meta[k] for k in ("type", "choices", "metavar") if meta[k] is not None})
    return kwargs


def run_options(config) -> dict:
    """What OUT/run.json and every checkpoint record of a run: every TrainConfig field, in field order."""
    return {name: getattr(config, name) for name in options()}


def model_overrides(*, img_size: Optional[int] = None, objective: str = "pixel",
                    vocab_size: Optional[int] = None) -> dict:
    """The ``ViTConfig`` fields a run overrides in its preset: the prediction head (its objective), the image
    size when given, and the vocabulary of the token head when given (the pixel head has none)."""
    overrides = {"head": objective}
    if img_size is not None:
        overrides["img_size"] = img_size
    if objective == "token" and vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return overrides


def _join(flags: list, fmt: str) -> str:
    items = [fmt.format(f) for f in flags]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def resume_rules(code: str = "{}") -> str:
    """The sentence that lists what --resume lets change: the KEPT options, then the PER_INVOCATION ones (the
    options naming the run, --out and --resume, left out). ``code`` formats each flag ('`{}`' for Markdown)."""
    kept = [flag(n) for n in options(KEPT)]
    once = [flag(n) for n in options(PER_INVOCATION) if n not in _NAMES_THE_RUN]
    return (f"{_join(kept, code)}, which keep the run's values when not given again, and {_join(once, code)}, "
            "which apply to one invocation")
