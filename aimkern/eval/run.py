"""``python -m aimkern.eval``: load the trunk and its random-init twin, extract (or reuse) features, run the
probes on rank 0, print a table and write ``OUT/eval.json``."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..models import CausalViT
from ..distributed import DistEnv, setup, teardown
from . import data as edata
from .features import Features, describe_layers, extract, resolve_layers
from .models import load_trunk, model_digest
from .probes import PROBES, AttentiveConfig, KnnConfig, LinearConfig, knn_probe, train_attentive, train_linear
from .report import format_table

EVAL_NAME = "eval.json"


@dataclass
class ProbeSettings:
    """Which probes run, and their recipes (the command line's --attn-*, --linear-*, --knn-* options)."""
    probes: List[str] = field(default_factory=lambda: list(PROBES))
    seed: int = 0
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)
    attn_heads: Optional[int] = None
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    progress: bool = True


def settings_from_args(args) -> ProbeSettings:
    return ProbeSettings(
        probes=list(args.probes), seed=args.seed, progress=not args.no_progress, attn_heads=args.attn_heads,
        attentive=AttentiveConfig(epochs=args.attn_epochs, batch_size=args.attn_batch_size, lr=args.attn_lr,
                                  weight_decay=args.attn_weight_decay, warmup_epochs=args.attn_warmup_epochs,
                                  num_queries=args.attn_queries),
        linear=LinearConfig(epochs=args.linear_epochs, batch_size=args.linear_batch_size, lr=args.linear_lr,
                            weight_decay=args.linear_weight_decay),
        knn=KnnConfig(k=args.knn_k, temperature=args.knn_temperature),
    )


def run_probes(train: Features, val: Features, *, num_classes: int, num_heads: int, settings: ProbeSettings,
               device: torch.device, tag: str = "") -> Dict[str, dict]:
    """Every requested probe on one model's features: {probe: {"top1", "top5", "seconds"}}."""
    out = {}
    for name in settings.probes:
        t0 = time.perf_counter()
        desc = f"{name} {tag}".strip()
        if name == "attentive":
            res = train_attentive(train.patches, train.labels, val.patches, val.labels, num_classes=num_classes,
                                  num_heads=settings.attn_heads or num_heads, cfg=settings.attentive,
                                  device=device, seed=settings.seed, progress=settings.progress, desc=desc)
        elif name == "linear":
            res = train_linear(train.pooled, train.labels, val.pooled, val.labels, num_classes=num_classes,
                               cfg=settings.linear, device=device, seed=settings.seed, progress=settings.progress,
                               desc=desc)
        else:
            res = knn_probe(train.pooled, train.labels, val.pooled, val.labels, num_classes=num_classes,
                            cfg=settings.knn, device=device)
        out[name] = {**res, "seconds": round(time.perf_counter() - t0, 3)}
    return out


def evaluate_models(models: Dict[str, CausalViT], data: edata.Labelled, *, layers, settings: ProbeSettings,
                    env: DistEnv, cache_dir: Optional[str] = None, batch_size: int = 128,
                    feature_dtype: str = "float32", native: bool = False) -> Dict[str, Dict[str, dict]]:
    """Extract each model's features of both splits (collective under torchrun) and, on rank 0, probe them:
    {model tag: {probe: result}} (empty on other ranks). Models are moved to the device and back to the CPU.
    ``native``: the splits yield lists of images at their own sizes (``aimkern.eval.native``)."""
    results = {}
    for tag, model in models.items():
        was_training = model.training
        model.eval().to(env.device)
        model_id = model_digest(model) if cache_dir is not None else ""
        if native:
            from .native import extract_native

            feats = {split.name: extract_native(model, split, layers, env=env, batch_size=batch_size,
                                                dtype=feature_dtype, desc=f"features {tag} {split.name}")
                     for split in (data.train, data.val)}
        else:
            feats = {split.name: extract(model, split, layers, env=env, batch_size=batch_size, cache_dir=cache_dir,
                                         model_id=model_id, dtype=feature_dtype, progress=settings.progress,
                                         desc=f"features {tag} {split.name}")
                     for split in (data.train, data.val)}
        model.cpu().train(was_training)
        if env.is_main:
            results[tag] = run_probes(feats["train"], feats["val"], num_classes=len(data.classes),
                                      num_heads=model.config.num_heads, settings=settings, device=env.device,
                                      tag=tag)
    return results


def run(args) -> dict:
    """Evaluate as ``args`` (from ``parse_args``) says; returns the report (rank 0; {} on other ranks)."""
    env = setup(args.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu":  # as aimkern.train: one thread unless told, extra threads stall on shared cores
        torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1))
    try:
        return _evaluate(args, env)
    finally:
        torch.set_num_threads(threads)
        teardown(env)


def _evaluate(args, env: DistEnv) -> dict:
    t0 = time.perf_counter()
    trunk = load_trunk(args.model, preset=args.preset, seed=args.init_seed, backend=args.backend,
                       img_size=args.img_size, weights=args.weights, timm_kwargs=args.timm_kwargs,
                       num_heads=args.num_heads)
    cfg = trunk.model.config
    native = getattr(args, "native", False)
    if native:
        from .native import NativeDecode, collate_list

        max_patches = args.max_patches or cfg.num_patches
        data = edata.image_folders(args.train, args.val, cfg.img_size, cfg.in_chans, args.workers,
                                   transform=NativeDecode(cfg.patch_size, max_patches, cfg.in_chans),
                                   collate_fn=collate_list, tag=f"/native{max_patches}")
    else:
        data = edata.load(args.data, args.train, args.val, cfg.img_size, cfg.in_chans, args.workers)
    layers = resolve_layers(args.layers, cfg.depth)
    dtype = args.feature_dtype if args.feature_dtype != "auto" else (
        "float16" if env.device.type == "cuda" else "float32")
    models = {"model": trunk.model}
    if trunk.baseline is not None and not args.no_baseline:
        models["random init"] = trunk.baseline()
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
        print(f"aimkern.eval: {trunk.name} ({cfg.dim}-wide, {cfg.depth} blocks, {cfg.img_size}px), data "
              f"{data.name} ({data.train.n} train / {data.val.n} val, {len(data.classes)} classes), features "
              f"{describe_layers(layers)}{f', native resolution (<= {max_patches} patches)' if native else ''}, "
              f"{env.world} process(es) on {env.device.type}", flush=True)
    results = evaluate_models(models, data, layers=layers, settings=settings_from_args(args), env=env,
                              cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
                              feature_dtype=dtype, native=native)
    if not env.is_main:
        return {}
    report = {
        "model": args.model, "name": trunk.name, "config": cfg.to_dict(), "data": data.name,
        "train_size": data.train.n, "val_size": data.val.n, "classes": len(data.classes),
        "layers": describe_layers(layers), "feature_dtype": dtype, "processes": env.world,
        "device": env.device.type, "seed": args.seed, "results": results,
        "native_max_patches": max_patches if native else None,
        "settings": asdict(settings_from_args(args)), "wall_s": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(args.out, EVAL_NAME), "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(results), flush=True)
    print(f"done in {report['wall_s']:.1f}s: {os.path.join(args.out, EVAL_NAME)}", flush=True)
    return report
