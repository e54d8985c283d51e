"""The launch layer every Triton launcher goes through.

One place owns what used to be decided per family:

* interpreter detection (``interpreting()``): CPU tensors under ``TRITON_INTERPRET=1``;
* the fp32 dot precision (``dot_precision``): 3xTF32, fp32-level accuracy on the tensor cores for every
  kernel (plain TF32 misses torch's fp32 error by ~100x; "ieee" FMA dots spill tens of KB on sm_90);
* autotune on / off and the config of a launch (``launch``), from a family's ``Choice``
  (kernels/launch_table.py): a config forced for the launch's autotune key (``_forced_configs``: decided
  once by measured dispatch, so every rank and a resumed run sum alike), else the interpreter config under
  the interpreter, the autotuner when the policy allows it and the Choice has several configs, else the
  first config;
* the launch policy (``LaunchPolicy``): frozen, read once when an op is called, passed into its custom op
  as typed arguments (ops/_custom_op.py) and saved for the backward, so that a choice made at forward time
  (e.g. the fused or split attention backward) still holds when autograd runs the backward;
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

from . import _forced_configs

BACKWARD_PATHS = ("auto", "fused", "split")


def interpreting() -> bool:
    """True when Triton's interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's interpreter multiplies bf16 operands of tl.dot as raw bits: every kernel built on tl.dot
# (attention, patch_embed, linear_cross_entropy) refuses bf16 there, with this one rule.
INTERPRETED_BF16 = "bfloat16 is not supported under Triton's interpreter (its bf16 tl.dot is wrong)"


def interpreter_dtype_problem(dtype, device_type: str) -> Optional[str]:
    """Why a tl.dot kernel would compute ``dtype`` (a torch.dtype or its name) wrong on ``device_type``
    tensors, i.e. under Triton's interpreter; None when it computes it right."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name == "bfloat16" and device_type != "cuda" and interpreting():
        return INTERPRETED_BF16
    return None


def check_interpretable_dtype(x: torch.Tensor, op: str) -> None:
    """TypeError for a tensor a tl.dot kernel would compute wrong under the interpreter (bf16 off CUDA)."""
    reason = interpreter_dtype_problem(x.dtype, x.device.type)
    if reason is not None:
        raise TypeError(f"{op}: {reason}; use float16 / float32 on CPU, or run bfloat16 on a CUDA GPU")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot ``input_precision`` for ``dtype`` inputs: 3xTF32 for fp32; 16-bit inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
    """One launch as the launch layer made it: the Choice, its positional args and constexpr kwargs, and its
    grid (META -> grid tuple, as ``launch`` took it: call it with a config's kwargs)."""

    choice: object
    args: tuple
    constexprs: dict
    policy: LaunchPolicy
    grid: Optional[Callable[[dict], tuple]] = None

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


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1): the autotuning key of a size that only changes the
    grid (attention's N_BUCKET), and the dispatch key's band of such a size (aimkern.specs)."""
    return 1 << max(0, n - 1).bit_length()


def autotunes(choice, policy: LaunchPolicy) -> bool:
    """Whether ``launch`` runs ``choice`` through the autotuner (then no config is known before the launch)."""
    return policy.autotune and len(choice.configs) > 1 and not interpreting()


_GPU_CONFIGS: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("aimkern_gpu_configs", default=None)


@contextlib.contextmanager
def gpu_configs(index: int = 0) -> Iterator[None]:
    """Interpreted launches inside the block run config ``index`` of the GPU table (its last config where a
    table has fewer) instead of the interpreter's own: the cost report (benchmarks/kernel_cost.py) counts
    the work of the tiles the GPU would run, for every config the autotuner may pick."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"gpu_configs: index must be an int >= 0, got {index!r}")
    token = _GPU_CONFIGS.set(index)
    try:
        yield
    finally:
        _GPU_CONFIGS.reset(token)


def gpu_configs_active() -> bool:
    """Whether launches run the GPU tables' configs even under the interpreter (``gpu_configs()``)."""
    return _GPU_CONFIGS.get() is not None


def fixed_config(choice, policy: LaunchPolicy):
    """The config ``launch`` runs when it does not autotune: the interpreter's under the interpreter (unless
    inside ``gpu_configs(i)``: the table's config i, or its last), else the first of the table. Launchers
    whose buffers depend on the tiling use Choices with one config."""
    if autotunes(choice, policy):
        raise ValueError(f"{choice.name}: an autotuned Choice has no fixed config")
    if not interpreting():
        return choice.configs[0]
    index = _GPU_CONFIGS.get()
    return choice.interpreter if index is None else choice.configs[min(index, len(choice.configs) - 1)]


def launch(choice, grid: Callable[[dict], tuple], args: tuple, *, dtype: torch.dtype, policy: LaunchPolicy,
           **constexprs) -> None:
    """Launch ``choice`` on ``args`` (positional, the kernel's runtime arguments) with ``constexprs``.

    grid:  META -> grid tuple; META holds the chosen config's block sizes.
    dtype: the inputs' dtype; it sets DOT_PRECISION for kernels that take one.
    """
    device = launch_device(choice, args)
    if "DOT_PRECISION" in choice.kernel.arg_names:
        constexprs = dict(constexprs, DOT_PRECISION=dot_precision(dtype))
    choice = fit_to_device(choice, device, constexprs, dtype)
    dry = False
    for seen, dry_run in _OBSERVERS.get():
        seen.append(Launch(choice, args, constexprs, policy, grid))
        dry = dry or dry_run
    if dry:
        return
    key = forced = None
    if len(choice.configs) > 1 and _forced_configs.active():  # a config decided before (e.g. by dispatch)
        key = _forced_configs.tune_key(choice, args, constexprs, dtype)
        forced = _forced_configs.forced_config(choice, key)
        if autotunes(choice, policy) or (policy.autotune and gpu_configs_active()):  # (or would on the GPU)
            _forced_configs.offered(choice, key)
    with device_guard(device):  # Triton launches on the current CUDA device, not on the tensors'
        if forced is None and autotunes(choice, policy):
            tuner = _autotuner(choice)
            tuner[grid](*args, **constexprs)
            if key is not None:  # read back what the autotuner ran (Autotuner.best_config: this launch's)
                _forced_configs.note(choice, key, tuner.best_config)
            return
        c = forced if forced is not None else fixed_config(choice, policy)
        if forced is not None:
            _forced_configs.note(choice, key, c)
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
# (capability, opt-in shared memory per block in bytes) of the devices the tables are built for; a meta
# tensor launches as one of them (``meta_device`` / ``meta_arch``), so the compile gate and the tests can
# drive the CUDA launch path on a CPU machine.
DEVICE_FACTS = {
    "sm_90": (90, 232448),  # H100 / H200 (and B200, sm_100: the same 227 KB)
    "sm_80": (80, 166912),  # A100 (and Orin, sm_87)
    "sm_120": (120, 101376),  # consumer Blackwell (RTX 50xx; RTX 30xx / 40xx, sm_86 / sm_89, alike: 99 KB)
}
# The Hopper tables' pipelines are sized for sm_90's 227 KB per block (the CE tiles take 128-192 KB): a
# device with less takes the sm_80 tables, whatever its capability, and keeps the configs that fit it.
HOPPER_TABLE_SHARED_MEMORY = DEVICE_FACTS["sm_90"][1]
_META_DEVICE: contextvars.ContextVar[tuple] = contextvars.ContextVar("aimkern_meta_device",
                                                                     default=DEVICE_FACTS["sm_90"])


@contextlib.contextmanager
def meta_device(capability: int, shared_memory: int) -> Iterator[None]:
    """Launchers called on meta tensors inside the block act as on a device of ``capability`` (e.g. 90)
    with ``shared_memory`` bytes of opt-in shared memory per block: its tables and the configs that fit."""
    token = _META_DEVICE.set((int(capability), int(shared_memory)))
    try:
        yield
    finally:
        _META_DEVICE.reset(token)


def meta_arch(arch: int) -> contextlib.AbstractContextManager:
    """``meta_device`` of the table arch ``arch`` (90: Hopper, 80: Ampere): the compile gate drives the
    launchers once per target."""
    return meta_device(*DEVICE_FACTS[{90: "sm_90", 80: "sm_80"}[arch]])


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> tuple:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if not shared:  # an older torch: ask Triton's driver
        from triton.runtime import driver

        shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return 10 * props.major + props.minor, int(shared)


def device_facts(device: torch.device) -> Optional[tuple]:
    """(capability, opt-in shared memory per block) of a CUDA or meta ``device``; None elsewhere (the
    interpreter has no shared memory to fit)."""
    if device.type == "meta":
        return _META_DEVICE.get()
    if device.type != "cuda":
        return None
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())


def table_arch(device: torch.device) -> int:
    """Which config tables a launch on ``device`` uses: 90 (Hopper: wgmma tiles, pipelines sized for 227 KB
    of shared memory per block) when the capability is 9.0 or later AND the device reports that much shared
    memory, else 80 (Ampere's tables: mma.sync tiles, shallower pipelines; also consumer Blackwell, sm_120,
    whose 99 KB the Hopper CE configs overflow). ``launch`` then drops the configs that do not fit the
    device (``fit_to_device``). Off CUDA and meta: 90 (the interpreter uses its own configs anyway)."""
    facts = device_facts(device)
    if facts is None:
        return 90
    capability, shared = facts
    return 90 if capability >= 90 and shared >= HOPPER_TABLE_SHARED_MEMORY else 80


_FITTED: dict = {}


def fit_to_device(choice, device: Optional[torch.device], constexprs: dict, dtype: torch.dtype):
    """``choice`` with only the configs whose shared memory (the Choice's ``shared`` estimate, an upper
    bound the compile gate checks against every compile) fits ``device``. None fitting: the smallest (the
    launch then succeeds or Triton says by how much it is over). The Choices that launchers read with
    ``fixed_config`` before the launch (to size buffers) keep their first config on every device of
    DEVICE_FACTS (tests/test_launch_layer.py), so what they read is what runs."""
    facts = device_facts(device) if device is not None else None
    if facts is None or getattr(choice, "shared", None) is None:
        return choice
    elem = dtype.itemsize
    key = (choice, facts[1], elem, tuple(sorted(constexprs.items())))
    fitted = _FITTED.get(key)
    if fitted is None:
        need = [choice.shared(c, constexprs, elem) for c in choice.configs]
        kept = tuple(c for c, b in zip(choice.configs, need) if b <= facts[1])
        if not kept:
            kept = (choice.configs[need.index(min(need))],)
        fitted = _FITTED[key] = choice if kept == tuple(choice.configs) else replace(choice, configs=kept)
    return fitted


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
