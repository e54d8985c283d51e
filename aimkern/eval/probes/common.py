"""What the probes share: top-k accuracy, the warmup + cosine schedule, seeded mini-batches of cached features."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

# Arrays up to this size are copied to the device once; larger ones are read from the memory map per batch.
PRELOAD_BYTES = 2 << 30


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """(n, C) scores, (n,) labels -> {"top1", "top5"}; top5 is None with 5 classes or fewer (it would be 1)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {"top1": hit[:, 0].float().mean().item(),
            "top5": hit.any(dim=1).float().mean().item() if num_classes > 5 else None}


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


class Rows:
    """Rows of a (memory-mapped) feature array as float32 tensors on ``device``; small arrays are preloaded,
    so both paths give the same floats."""

    def __init__(self, array: np.ndarray, device: torch.device):
        self.array, self.device = array, device
        self.n = array.shape[0]
        self.loaded: Optional[torch.Tensor] = None
        if array.nbytes <= PRELOAD_BYTES:
            self.loaded = torch.from_numpy(np.array(array, dtype=np.float32)).to(device)  # a writable copy

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.loaded is not None:
            return self.loaded[idx.to(self.device)]
        rows = np.sort(idx.numpy())  # sorted reads are kinder to the page cache; order is restored below
        order = torch.from_numpy(np.argsort(np.argsort(idx.numpy())))
        x = torch.from_numpy(np.array(self.array[rows], dtype=np.float32))[order]
        return x.to(self.device, non_blocking=True)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; the last partial batch is dropped unless it is the only one
    (a batch of one row would break BatchNorm's statistics)."""
    perm = torch.randperm(n, generator=generator)
    full = max(1, n // batch_size)
    for b in range(full):
        yield perm[b * batch_size:(b + 1) * batch_size] if n >= batch_size else perm


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def in_order(n: int, batch_size: int) -> Iterator[Tuple[int, torch.Tensor]]:
    for s in range(0, n, batch_size):
        yield s, torch.arange(s, min(n, s + batch_size))


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of ``total`` steps, or None when progress is off or stderr is not a terminal (a log file)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None)
    return None if bar.disable else bar


def fit_cross_entropy(logits_of, opt: torch.optim.Optimizer, xs, ys: torch.Tensor, *, epochs: int, batch_size: int,
                      warmup_epochs: float, generator: torch.Generator, desc: str, progress: bool) -> None:
    """Mini-batch cross-entropy training of a probe: ``logits_of(rows) -> (b, classes)`` over ``xs`` (a
    ``Rows``) with labels ``ys``, seeded batch order, linear warmup then cosine, one optional tqdm bar."""
    import torch.nn.functional as F

    per_epoch = steps_per_epoch(xs.n, batch_size)
    total, warmup = epochs * per_epoch, int(warmup_epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    bar = progress_bar(total, desc, progress)
    for _ in range(epochs):
        for idx in epoch_batches(xs.n, batch_size, generator):
            loss = F.cross_entropy(logits_of(xs[idx]), ys[idx.to(ys.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
