"""The one shape every kernel family uses to say what its launcher may run.

A family module (attention.py, patch_embed.py, cross_entropy.py, pixel_loss.py) turns a problem (head
dim, dtype, sequence band, GEMM size...) into a ``Choice``: the @triton.jit kernel, its candidate configs
(autotuned when there are several and the launch policy allows it; the first one otherwise) and the one
config it runs under Triton's interpreter, where an autotuner with more than one config cannot run.

``aimkern.ops._launch.launch`` is the only code that turns a Choice into a kernel launch, and
``benchmarks/kernel_report.py`` compiles every config of every Choice the launchers can make. This module
imports Triton only (no torch), so that report can run against any Triton version in a small venv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import triton


# Below this many multiply-adds a GEMM-like launch takes its family's fixed config: tuning would cost more
# than it saves, and small test shapes would each trigger a tuning round. ViT-B/16's patch embedding is
# 2.9e10 at batch 256; the 8192-way head on 65,536 tokens is 4.1e11.
AUTOTUNE_MIN_MACS = 1 << 28


def tunable(macs: int, sixteen_bit: bool) -> bool:
    """Whether a GEMM-like launch of ``macs`` multiply-adds gets autotuning candidates (16-bit only: fp32
    is a correctness path with one config that fits shared memory)."""
    return sixteen_bit and macs >= AUTOTUNE_MIN_MACS


def cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    """A launch config: constexpr block sizes plus warps and pipeline stages."""
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def config_key(c: triton.Config) -> tuple:
    """A hashable identity of a config (triton.Config hashes by object)."""
    return tuple(sorted(c.kwargs.items())) + (("num_warps", c.num_warps), ("num_stages", c.num_stages))


@dataclass(frozen=True, eq=False)
class Choice:
    """What a launcher may run for one problem.

    kernel:      the @triton.jit function.
    configs:     candidate configs; configs[0] is the pick when autotuning is off, the others are only
                 ever reached through the autotuner (so every one of them must compile, spill-free).
    interpreter: the one config used under Triton's interpreter (CPU tests).
    key:         autotuning key: kernel argument names whose values select a tuned config.
    restore:     pointer arguments the autotuner restores between trials (read-modify-write outputs).
    shared:      (config, the launch's constexprs, element bytes of the inputs) -> bytes of shared memory
                 the config needs at most: the launch layer keeps the configs that fit the device, and the
                 compile gate fails any compile that needs more than this says. None: a few KB at most.
    """

    kernel: object
    configs: tuple
    interpreter: triton.Config
    key: tuple = ()
    restore: tuple = ()
    shared: Optional[Callable] = None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def identity(self) -> tuple:
        return (self.name, tuple(config_key(c) for c in self.configs), self.key, self.restore)
