"""The launch layer every Triton launcher goes through.

One place owns what used to be decided per family:

* interpreter detection (``interpreting()``): CPU tensors under ``TRITON_INTERPRET=1``;
* the fp32 dot precision (``dot_precision``): 3xTF32, fp32-level accuracy on the tensor cores for every
  kernel (plain TF32 misses torch's fp32 error by ~100x; "ieee" FMA dots spill tens of KB on sm_90);
* autotune on / off and the config of a launch (``launch``), from a family's ``Choice``
  (kernels/launch_table.py): the interpreter config under the interpreter, the autotuner when the
  policy allows it and the Choice has several configs, else the first config;
* the launch policy (``LaunchPolicy``): frozen, read once when an op is called, passed into its custom op
  inside the op's encoded call (ops/_boundary.py) and saved for the backward, so that a choice made at
  forward time (e.g. the fused or split attention backward) still holds when autograd runs the backward;
* the kernel modules (``kernels(family)``): aimkern/kernels/<family>.py, imported on first use.

Observers (``observe()``) see every launch: tests use it to prove which kernels ran, and the compile gate
(benchmarks/kernel_report.py) uses ``observe(dry_run=True)`` to collect the exact launches of the real
launchers (on meta tensors) without running anything.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch

from ._boundary import crosses_boundary

BACKWARD_PATHS = ("auto", "fused", "split")


def interpreting() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot ``input_precision`` for ``dtype`` inputs: 3xTF32 for fp32; 16-bit inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@crosses_boundary
@dataclass(frozen=True)
class LaunchPolicy:
    """How the Triton launchers choose among their configs. Frozen: it is read when an op is called.

    autotune:           benchmark each family's candidate configs on first use (CUDA only); False takes the
                        first config of each table (one compile per family: quick tests, reproducible runs).
    attention_backward: "auto" (fused one-program-per-head backward when a head's K, V fit on chip, split
                        dK/dV + dQ kernels otherwise), "fused" (refused where it does not fit) or "split".
    """

    autotune: bool = True
    attention_backward: str = "auto"

    def __post_init__(self):
        if not isinstance(self.autotune, bool):
            raise TypeError(f"LaunchPolicy: autotune must be a bool, got {type(self.autotune).__name__}")
        if self.attention_backward not in BACKWARD_PATHS:
            raise ValueError(
                f"LaunchPolicy: attention_backward must be one of {BACKWARD_PATHS}, got {self.attention_backward!r}"
            )


def _env_policy() -> LaunchPolicy:
    """The default policy: AIMKERN_AUTOTUNE=0 turns autotuning off for a whole process."""
    return LaunchPolicy(autotune=os.environ.get("AIMKERN_AUTOTUNE", "1") != "0")


_POLICY: contextvars.ContextVar[LaunchPolicy] = contextvars.ContextVar("aimkern_launch_policy", default=_env_policy())


def current_policy() -> LaunchPolicy:
    return _POLICY.get()


@contextlib.contextmanager
def launch_policy(policy: Optional[LaunchPolicy] = None, **changes) -> Iterator[LaunchPolicy]:
    """Use ``policy`` (or the current one with ``changes``) for the ops called inside the block.

    The policy is captured when an op runs its forward; its backward follows that choice even when
    autograd runs it after the block has ended::

        with aimkern.ops.launch_policy(attention_backward="split"):
            o = aimkern.attention(q, k, v, is_causal=True)
        o.sum().backward()   # the split dK/dV + dQ kernels
    """
    new = replace(policy or current_policy(), **changes)
    token = _POLICY.set(new)
    try:
        yield new
    finally:
        _POLICY.reset(token)


def kernels(family: str):
    """The kernel module aimkern/kernels/<family>.py ("attention", "cross_entropy", "patch_embed",
    "pixel_loss"). Imported on first use, not with aimkern: Triton reads TRITON_INTERPRET when a kernel is
    defined, so the test setup (or the user) must decide it first. Dynamo traces the look-up in
    ``sys.modules`` (it refuses ``importlib``): an op traced before any eager call imports through an eager
    helper first (attention's ``fused_backward_fits``)."""
    module = sys.modules.get("aimkern.kernels." + family)
    if module is None:
        module = importlib.import_module("aimkern.kernels." + family)
    return module


# ------------------------------------------------------------------------------------------- observers
@dataclass(frozen=True)
class Launch:
    """One launch as the launch layer made it: the Choice, its positional args and constexpr kwargs."""

    choice: object
    args: tuple
    constexprs: dict
    policy: LaunchPolicy

    @property
    def name(self) -> str:
        return self.choice.name


_OBSERVERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("aimkern_launch_observers", default=())


@contextlib.contextmanager
def observe(dry_run: bool = False) -> Iterator[list]:
    """Collect every ``Launch`` made inside the block into the yielded list; ``dry_run`` skips the launches."""
    seen: list = []
    token = _OBSERVERS.set(_OBSERVERS.get() + ((seen, dry_run),))
    try:
        yield seen
    finally:
        _OBSERVERS.reset(token)


# ---------------------------------------------------------------------------------------------- launch
_AUTOTUNERS: dict = {}


def _autotuner(choice):
    """One autotuner per distinct (kernel, configs, key): its tuning cache is shared by equal Choices."""
    import triton

    ident = choice.identity()
    if ident not in _AUTOTUNERS:
        _AUTOTUNERS[ident] = triton.autotune(
            list(choice.configs), key=list(choice.key), restore_value=list(choice.restore)
        )(choice.kernel)
    return _AUTOTUNERS[ident]


def cdiv(a: int, b: int) -> int:
    """Ceiling division, for grids and tile counts."""
    return -(-a // b)


def autotunes(choice, policy: LaunchPolicy) -> bool:
    """Whether ``launch`` runs ``choice`` through the autotuner (then no config is known before the launch)."""
    return policy.autotune and len(choice.configs) > 1 and not interpreting()


_GPU_CONFIGS: contextvars.ContextVar[bool] = contextvars.ContextVar("aimkern_gpu_configs", default=False)


@contextlib.contextmanager
def gpu_configs() -> Iterator[None]:
    """Interpreted launches inside the block run the GPU table's first config instead of the interpreter's
    own (the cost report, benchmarks/kernel_cost.py, counts the work of the tiles the GPU would run)."""
    token = _GPU_CONFIGS.set(True)
    try:
        yield
    finally:
        _GPU_CONFIGS.reset(token)


def gpu_configs_active() -> bool:
    """Whether launches run the GPU tables' configs even under the interpreter (``gpu_configs()``)."""
    return _GPU_CONFIGS.get()


def fixed_config(choice, policy: LaunchPolicy):
    """The config ``launch`` runs when it does not autotune: the interpreter's under the interpreter (unless
    inside ``gpu_configs()``), else the first of the table. Launchers whose buffers depend on the tiling use
    Choices with one config."""
    if autotunes(choice, policy):
        raise ValueError(f"{choice.name}: an autotuned Choice has no fixed config")
    return choice.interpreter if interpreting() and not _GPU_CONFIGS.get() else choice.configs[0]


def launch(choice, grid: Callable[[dict], tuple], args: tuple, *, dtype: torch.dtype, policy: LaunchPolicy,
           **constexprs) -> None:
    """Launch ``choice`` on ``args`` (positional, the kernel's runtime arguments) with ``constexprs``.

    grid:  META -> grid tuple; META holds the chosen config's block sizes.
    dtype: the inputs' dtype; it sets DOT_PRECISION for kernels that take one.
    """
    device = launch_device(choice, args)
    if "DOT_PRECISION" in choice.kernel.arg_names:
        constexprs = dict(constexprs, DOT_PRECISION=dot_precision(dtype))
    dry = False
    for seen, dry_run in _OBSERVERS.get():
        seen.append(Launch(choice, args, constexprs, policy))
        dry = dry or dry_run
    if dry:
        return
    with device_guard(device):  # Triton launches on the current CUDA device, not on the tensors'
        if autotunes(choice, policy):
            _autotuner(choice)[grid](*args, **constexprs)
            return
        c = fixed_config(choice, policy)
        meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        choice.kernel[grid(meta)](*args, **constexprs, **meta)


def launch_device(choice, args: tuple) -> Optional[torch.device]:
    """The one device of a launch's tensor arguments (None without any). Tensors on two devices are a
    ValueError naming both kernel arguments: a kernel reads every pointer on the device it runs on, so a
    pointer into another GPU's memory would be read as garbage, never refused by the hardware."""
    names = choice.kernel.arg_names
    first = None
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        if first is None:
            first = (i, a.device)
        elif a.device != first[1]:
            name = lambda j: names[j] if j < len(names) else f"argument {j}"  # noqa: E731
            raise ValueError(f"{choice.name}: {name(i)} is on {a.device} but {name(first[0])} is on {first[1]}; "
                             "every tensor of a launch must be on one device")
    return first[1] if first is not None else None


def device_guard(device: Optional[torch.device]):
    """The context a launch on ``device`` runs in: ``torch.cuda.device(device)`` for a CUDA device (Triton
    launches on, and takes the stream of, the *current* device, which need not be the tensors'), else a
    no-op."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- device facts
_META_ARCH: contextvars.ContextVar[int] = contextvars.ContextVar("aimkern_meta_arch", default=90)


@contextlib.contextmanager
def meta_arch(arch: int) -> Iterator[None]:
    """Launchers called on meta tensors pick the configs of ``arch`` (90: Hopper, 80: Ampere) inside the
    block: the compile gate drives them once per target."""
    token = _META_ARCH.set(arch)
    try:
        yield
    finally:
        _META_ARCH.reset(token)


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def table_arch(device: torch.device) -> int:
    """Which config tables a launch on ``device`` uses: 90 (Hopper: wgmma tiles, 228 KB shared memory and
    later archs) or 80 (Ampere / Ada: mma.sync, whose accumulators need smaller tiles to stay in registers).
    Off CUDA: 90, unless ``meta_arch`` says otherwise (the interpreter uses its own configs anyway)."""
    if device.type == "meta":
        return _META_ARCH.get()
    if device.type != "cuda":
        return 90
    cap = _capability_of(device.index if device.index is not None else torch.cuda.current_device())
    return 90 if cap >= 90 else 80


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for meta tensors, as on an H100/H200: the compile gate
    sees the CUDA path; 1 elsewhere, e.g. under Triton's interpreter)."""
    if device.type == "meta":
        return 132
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
