"""Apple's released AIM attention-probe heads, with ml-aim's probe semantics.

ml-aim releases, per AIMv1 backbone, an ``AttentionPoolingClassifier`` trained on ImageNet over the mean of
6 blocks' outputs (before the final norm): the "best" 6 (``LAYERS_BEST``) or the "last" 6. Its state dict
(``head.bn.*`` running statistics of an affine-free BatchNorm1d, ``head.cls_token`` the learned query,
``head.k`` / ``head.v`` / ``head.linear``) loads into ``aimkern.eval``'s ``AttentivePoolingHead``, which
computes the same function (its heads: the backbone's). Images go through AIM's evaluation transform:
resize to ceil(img / 0.875) bicubic, centre crop, ImageNet mean / std for AIMv1, CLIP's for AIMv2.

    python -m aimkern.eval --init BACKBONE.pth --head HEAD.pth --data DIR [--probe-layers best|last|I,J,...]

reproduces Apple's released classifier on a labelled ImageFolder tree DIR (class folders in ImageNet's
sorted order); ``--data digits`` is a smoke test on scikit-learn's bundled digits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence, Tuple

import torch

from ..argtypes import positive_int
from ..models import CausalViT
from .probes.attentive import AttentivePoolingHead

# ml-aim aim-v1/aim/v1/constants.py LAYERS_BEST, by aimkern preset.
LAYERS_BEST = {"aim-600m": (14, 15, 16, 17, 18, 19), "aim-1b": (12, 13, 14, 15, 16, 17),
               "aim-3b": (12, 13, 14, 15, 16, 17), "aim-7b": (14, 15, 16, 17, 18, 19)}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HEAD_KEYS = {"k.weight": "k.weight", "v.weight": "v.weight", "cls_token": "query", "linear.weight": "linear.weight",
              "linear.bias": "linear.bias", "bn.running_mean": "bn.running_mean", "bn.running_var": "bn.running_var",
              "bn.num_batches_tracked": "bn.num_batches_tracked"}


def load_aim_probe_head(src, num_heads: int) -> AttentivePoolingHead:
    """ml-aim's attention-probe head (a ``.pth`` path or its state dict, keys with or without ``head.``) as an
    ``AttentivePoolingHead`` in eval mode; ``num_heads`` is the backbone's. A bias-free ``linear`` (as released)
    gets a zero bias. Any other key, a missing one or a query count other than 1 is a ValueError."""
    from ..checkpoints import read_file

    state = src if isinstance(src, dict) else read_file(src)[0]
    state = {k[len("head."):] if k.startswith("head.") else k: v for k, v in state.items()}
    unknown = sorted(set(state) - set(_HEAD_KEYS))
    required = {"k.weight", "v.weight", "cls_token", "linear.weight", "bn.running_mean", "bn.running_var"}
    missing = sorted(required - set(state))
    if unknown or missing:
        raise ValueError(f"head: not an ml-aim AttentionPoolingClassifier state dict: unknown keys {unknown}, "
                         f"missing {missing}")
    query = state["cls_token"]
    if query.dim() != 3 or query.shape[:2] != (1, 1):
        raise ValueError(f"head: cls_token must be (1, 1, dim) (one query), got {tuple(query.shape)}")
    classes, dim = state["linear.weight"].shape
    head = AttentivePoolingHead(dim, classes, num_heads=num_heads, num_queries=1)
    mapped = {_HEAD_KEYS[k]: v for k, v in state.items()}
    mapped.setdefault("linear.bias", torch.zeros(classes, dtype=state["linear.weight"].dtype))
    mapped.setdefault("bn.num_batches_tracked", torch.tensor(0))
    head.load_state_dict(mapped, strict=True)
    return head.eval()


def probe_layers(spec: str, model: CausalViT) -> Tuple[int, ...]:
    """'best' (ml-aim's LAYERS_BEST for the model's preset), 'last' (the last min(6, depth) blocks) or
    comma-separated block indices -> sorted block indices."""
    from ..checkpoints.infer import matching_preset

    depth = model.config.depth
    if spec == "last":
        return tuple(range(depth - min(6, depth), depth))
    if spec == "best":
        preset = matching_preset(model.config)
        if preset not in LAYERS_BEST:
            raise ValueError(f"--probe-layers best: ml-aim names best layers for {sorted(LAYERS_BEST)} only; this "
                             f"trunk is {preset or 'no preset'}: give 'last' or the block indices")
        return LAYERS_BEST[preset]
    try:
        picked = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        picked = []
    if not picked or not all(0 <= i < depth for i in picked):
        raise ValueError(f"--probe-layers must be 'best', 'last' or block indices in [0, {depth}), got {spec!r}")
    return tuple(picked)


def mean_std_for(model: CausalViT) -> tuple:
    """ImageNet statistics for AIMv1-style trunks (LayerNorm, GELU), CLIP's for AIMv2 (RMSNorm, SwiGLU)."""
    return CLIP_MEAN_STD if model.config.norm == "rmsnorm" else IMAGENET_MEAN_STD


def aim_eval_transform(img_size: int, mean_std: tuple):
    """ml-aim's val_transforms: Resize(ceil(img / 0.875), bicubic), CenterCrop(img), ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize(math.ceil(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(*mean_std),
    ])


@torch.no_grad()
def classify(model: CausalViT, head: AttentivePoolingHead, images: torch.Tensor, layers: Sequence[int]):
    """(B, C, H, W) images -> (B, classes) logits: the head over the mean of ``layers``' block outputs."""
    from .features import layer_features

    return head(layer_features(model, images, tuple(layers)))


def _batches(args, model: CausalViT):
    """(images, labels) batches of --data: an ImageFolder tree, or 'digits'."""
    if args.data == "digits":
        from .data import digits

        split = digits(model.config.img_size, model.config.in_chans).val
        idx = [list(range(s, min(split.n, s + args.batch_size))) for s in range(0, split.n, args.batch_size)]
        for b, images in zip(idx, split.batches(idx)):
            yield images, torch.as_tensor(split.labels[b])
        return
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is not a directory (an ImageFolder tree) nor 'digits'")
    folder = ImageFolder(args.data, transform=aim_eval_transform(model.config.img_size, args.mean_std))
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers)
    yield from loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aimkern.eval",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="backbone checkpoint, any layout CausalViT.from_checkpoint reads")
    p.add_argument("--head", required=True, help="ml-aim attention-probe head (.pth)")
    p.add_argument("--data", required=True, help="labelled ImageFolder tree, or 'digits' (a smoke test)")
    p.add_argument("--preset", default=None, help="the backbone's preset (default: inferred from its shapes)")
    p.add_argument("--img-size", type=positive_int, default=None, help="image size of a sin-cos backbone")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="the backbone's heads, when its width is no released model's")
    p.add_argument("--probe-layers", default="best", help="'best' (default), 'last' or block indices I,J,...")
    p.add_argument("--mean-std", choices=("auto", "imagenet", "clip"), default="auto",
                   help="normalization: 'auto' is ImageNet's for AIMv1 trunks, CLIP's for AIMv2 (default)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Evaluate a released backbone + probe head; prints and returns {"top1", "top5", "n", ...}."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_heads", args.num_heads)) if v is not None}
    model = CausalViT.from_checkpoint(args.init, preset=args.preset, head_depth=0, **overrides).to(device).eval()
    head = load_aim_probe_head(args.head, model.config.num_heads).to(device)
    if head.k.in_features != model.config.dim:
        raise ValueError(f"--head is {head.k.in_features} wide but the backbone is {model.config.dim} wide")
    layers = probe_layers(args.probe_layers, model)
    args.mean_std = {"imagenet": IMAGENET_MEAN_STD, "clip": CLIP_MEAN_STD}.get(args.mean_std, mean_std_for(model))
    correct1 = correct5 = n = 0
    for images, labels in _batches(args, model):
        logits = classify(model, head, images.to(device), layers).float().cpu()
        if int(labels.max()) >= logits.shape[1]:
            raise ValueError(f"--data has class index {int(labels.max())} but the head has {logits.shape[1]} classes")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        n += labels.numel()
    report = {"backbone": args.init, "head": args.head, "data": args.data, "layers": list(layers), "n": n,
              "top1": 100.0 * correct1 / max(n, 1), "top5": 100.0 * correct5 / max(n, 1)}
    print(f"aimkern.eval (released AIM probe): top-1 {report['top1']:.2f} %, top-5 {report['top5']:.2f} % on {n} "
          f"images of {args.data} (blocks {','.join(map(str, layers))})", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report
