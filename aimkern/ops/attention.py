"""The Triton path of ``aimkern.attention``: block-causal raster-order attention, SDPA's (B, H, N, D) layout.

The launchers (kernels/attention.py picks configs; the kernels are in kernels/attention_fwd.py and
kernels/attention_bwd.py), their custom ops (``aimkern::attention_fwd``, ``aimkern::attention_bwd``, typed
arguments: ops/_custom_op.py), the autograd wiring and the entries ``attention_triton`` /
``attention_qkvpacked_triton`` (checked inputs in, as ``aimkern.functional`` and the dispatch candidates
call them):

    forward:  o, lse = attention_fwd(q, k, v, prefix_len, <AttentionParams>, <LaunchPolicy>, layout)
    backward: dq, dk, dv = attention_bwd(do, q, k, v, o, lse, prefix_len, <the forward's scalars>)

lse is (B, H, N) fp32, natural log; the backward is deterministic (no atomics) unless the params say
otherwise. The scalars are the mask as the kernels see it (``AttentionParams``: is_causal only where a
causal block is shorter than N, the scale resolved), the launch choices (``LaunchPolicy``: autotune, the
fused or split backward) and the layout; the forward's are saved and handed to the backward op as they stand.

Outputs (o, dq, dk, dv) are (B, N, H, D) memory returned as (B, H, N, D) views: ``o.transpose(1, 2)`` is
then contiguous, so a ViT block's reshape to (B, N, H * D) before the output projection copies nothing.
Inputs are read through their strides (strided views of a packed qkv, stride-0 expanded gradients).

``attention_qkvpacked_triton(qkv)`` takes the packed (B, N, 3, H, D) activation of a ViT block through the
same two ops (layout "packed": qkv in place of q, k and v None): the backward kernels write dq, dk, dv
through strides straight into one (B, N, 3, H, D) gradient, where attention on unbound views would make
autograd stack them into (3, B, H, N, D) and copy that again into the packed order.

Public launcher entry points (the custom ops run them; the compile gate drives them on meta tensors):
``launch_forward``, ``launch_backward``, ``backward_path``, ``fused_backward_fits`` and ``unpack``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ._custom_op import TypedOp
from ._launch import (
    LaunchPolicy, cdiv, check_interpretable_dtype, current_policy, fixed_config, interpreting, kernels, launch, pow2,
    table_arch,
)

OP = "attention"


def _log2e() -> float:
    """log2(e), read from the one place it is written (kernels/constants.py): the kernels use exp2, so the
    launchers pre-scale the scores by it."""
    return kernels("constants").LOG2E.value


@dataclass(frozen=True)
class AttentionParams:
    """The options of one attention call (the public keyword arguments, one field each)."""

    is_causal: bool = False  # False: full bidirectional; True: (block-)causal in raster order
    block_size: int = 1  # causal granularity in tokens: 1 = token causal, grid width = row by row
    scale: Optional[float] = None  # softmax scale; None means D ** -0.5
    deterministic: bool = True  # bit-identical gradients run to run (ordered dQ accumulation at long N)

    def check(self, op: str = OP) -> None:
        """Raise a TypeError / ValueError naming the option that has the wrong type or range."""
        if not isinstance(self.is_causal, bool):
            raise TypeError(f"{op}: is_causal must be a bool, got {type(self.is_causal).__name__}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{op}: block_size must be an int >= 1, got {self.block_size!r}")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))):
            raise TypeError(f"{op}: scale must be None or a float, got {type(self.scale).__name__}")  # True is not 1.0
        if self.scale is not None and not abs(self.scale) < float("inf"):  # NaN fails the comparison too
            raise ValueError(f"{op}: scale must be a finite float, got {self.scale}")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"{op}: deterministic must be a bool, got {type(self.deterministic).__name__}")

    def resolved_scale(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else float(self.scale)



def effective_causal(is_causal: bool, block_size: int, n: int) -> bool:
    """Whether a mask is causal as the kernels see it: one causal block spanning all N tokens is full
    attention (every query sees every key), and runs as such."""
    return is_causal and block_size < n


def _bhnd_empty(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, N, D) tensor laid out as (B, N, H, D) memory."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).permute(0, 2, 1, 3)


# CUDA's grid limits: axis 0 takes 2**31 - 1 programs, axes 1 and 2 take 65,535, so B * H = 70,000 cannot be
# an axis of its own. The tiled kernels run on (tiles, B * H) while B * H fits axis 1, and on a flat axis-0
# grid of tiles * B * H programs, tiles fastest, above it (FLAT; flat_program in kernels/attention_fwd.py):
# the flat form's division costs sm_80's D = 64 causal forward a 16 B spill, so only huge batches pay it.
# The one-program-per-head kernels (fused, key tail) always run B * H programs on axis 0.
GRID_X_MAX = 2**31 - 1
FLAT_ABOVE = 65_535  # B * H above which the tiled kernels take the flat grid (tests lower it)


# Open flat_grid_forced() blocks. A plain list, not a ContextVar: autograd runs a CUDA backward on its own
# device thread, which does not see the caller's context, and the backward's launches must be flat too.
_FLAT_FORCED: list = []


def flat_launch(bh: int) -> bool:
    """Whether a launch for ``bh`` = B * H heads takes the flat grid (the kernels' FLAT constexpr)."""
    return bh > FLAT_ABOVE or bool(_FLAT_FORCED)


@contextlib.contextmanager
def flat_grid_forced(flat: bool = True) -> Iterator[None]:
    """Launches inside the block take the flat grid whatever B * H is (``flat``; False: no change).
    Dispatch's verification runs in it when the real call has more than FLAT_ABOVE heads, so the small
    problem runs the kernels' FLAT code that the real call runs."""
    token = object()
    if flat:
        _FLAT_FORCED.append(token)
    try:
        yield
    finally:
        _FLAT_FORCED[:] = [t for t in _FLAT_FORCED if t is not token]


def flat_grid(tiles: int, bh: int) -> tuple:
    """The grid of ``tiles`` programs for each of ``bh`` = B * H heads: (tiles, bh), or (tiles * bh,) when
    ``flat_launch(bh)``; a ValueError past CUDA's axis-0 limit."""
    programs = tiles * bh
    if programs > GRID_X_MAX:
        raise ValueError(f"{OP}: {tiles} tiles x B * H = {bh} heads is {programs} programs, more than CUDA's "
                         f"grid of {GRID_X_MAX}; split the batch")
    return (programs,) if flat_launch(bh) else (tiles, bh)


def heads_grid(bh: int) -> tuple:
    """One program per batch * head, on axis 0 (the fused and key-tail kernels)."""
    return (flat_grid(1, bh)[-1],)  # bh, after flat_grid's limit check


def unpack(qkv: torch.Tensor) -> tuple:
    """q, k, v as (B, H, N, D) strided views of a (B, N, 3, H, D) tensor (no copy)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# ------------------------------------------------------------------------------------------ launchers
# The public launcher entry points: what the custom ops run, and what the compile gate
# (benchmarks/kernel_problems.py) drives on meta tensors. ``params`` are the kernels' view
# of the mask: is_causal only where a causal block is shorter than N; scale may be None (D ** -0.5).
def launch_forward(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams, policy: LaunchPolicy):
    """q, k, v (B, H, N, D) any strides, prefix_len None or int32 (B,) contiguous ->
    (o (B, H, N, D) as a view of (B, N, H, D) memory, lse (B, H, N) fp32, natural log)."""
    b, h, n, d = q.shape
    o = _bhnd_empty(q)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    if b * h == 0:
        return o, lse
    kern = kernels("attention")
    fp32 = q.dtype == torch.float32
    scale = params.resolved_scale(d)
    split = kern.query_tail_start(n)  # queries [split, n) go to the narrow key-major tail kernel
    tensors = (q, k, v, o, lse, prefix_len if prefix_len is not None else lse)
    strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride())
    flags = dict(HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal, HAS_PREFIX=prefix_len is not None,
                 FLAT=flat_launch(b * h))
    launch(
        kern.forward(d, fp32, n, table_arch(q.device)), lambda META: flat_grid(cdiv(split, META["BLOCK_M"]), b * h),
        (*tensors, *strides, h, n, split, pow2(n), params.block_size, scale * _log2e()),
        dtype=q.dtype, policy=policy, **flags,
    )
    if split < n:
        launch(
            kern.forward_tail(d, fp32), lambda META: flat_grid(cdiv(n - split, META["BLOCK_M"]), b * h),
            (*tensors, *strides, h, n, split, params.block_size, scale * _log2e()),
            dtype=q.dtype, policy=policy, **flags,
        )
    return o, lse


def launch_backward(do, q, k, v, o, lse, prefix_len: Optional[torch.Tensor], params: AttentionParams,
                    policy: LaunchPolicy, out: Optional[tuple] = None) -> tuple:
    """dq, dk, dv of (B, H, N, D) inputs (do, o as well: any strides). ``policy.attention_backward``:
    "fused" or "split" (the tiled kernel; "auto" is resolved here by ``backward_path``);
    ``params.deterministic`` orders the tiled kernel's dQ accumulation. ``out``: optional preallocated
    (dq, dk, dv), any (B, H, N, D) strided views (the packed layout passes slices of one (B, N, 3, H, D)
    buffer); every kernel stores through the output strides, so nothing is copied afterwards."""
    b, h, n, d = q.shape
    dq, dk, dv = out if out is not None else (_bhnd_empty(q), _bhnd_empty(k), _bhnd_empty(v))
    if b * h == 0:
        return dq, dk, dv
    kern = kernels("attention")
    fp32 = q.dtype == torch.float32
    scale = params.resolved_scale(d)
    path = backward_path(d, q.dtype, n, q.device, policy)
    common = dict(
        dtype=q.dtype, policy=policy,
        HEAD_D=d, BLOCK_D=kern.block_d(d), IS_CAUSAL=params.is_causal, HAS_PREFIX=prefix_len is not None,
    )
    prefix = prefix_len if prefix_len is not None else lse  # never read when HAS_PREFIX is False
    if path == "fused":
        choice = kern.backward_fused(d, fp32, n)
        launch(
            choice, lambda META: heads_grid(b * h),
            (q, k, v, o, do, lse, dq, dk, dv, prefix,
             *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
             *dq.stride(), *dk.stride(), *dv.stride(),
             h, n, params.block_size, scale * _log2e(), scale),
            K_TILES=kern.fused_key_tiles(n, fixed_config(choice, policy)), **common,
        )
        return dq, dk, dv

    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    launch(
        kern.backward_preprocess(), lambda META: flat_grid(cdiv(n, META["BLOCK_M"]), b * h),
        (o, do, delta, *o.stride(), *do.stride(), h, n),
        dtype=q.dtype, policy=policy, HEAD_D=d, BLOCK_D=kern.block_d(d), FLAT=flat_launch(b * h),
    )
    choice = kern.backward_tiled(d, fp32, n, table_arch(q.device))
    dq_acc = torch.zeros((b * h, n, d), device=q.device, dtype=torch.float32)
    # One turn counter per query tile (>= the tiles of any config); never touched without DETERMINISTIC.
    sem_shape = (b * h, cdiv(n, kern.BWD_QUERY_TAIL)) if params.deterministic else (1,)
    sem = torch.zeros(sem_shape, device=q.device, dtype=torch.int32)
    k_end, key_tile = kern.key_tail(n, d)
    in_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride())
    if key_tile:  # the last keys first, in one narrow tile: their dQ shares land before the tiled kernel's
        launch(
            kern.backward_key_tail(d, fp32, key_tile, table_arch(q.device)), lambda META: heads_grid(b * h),
            (q, k, v, do, lse, delta, dk, dv, dq_acc, prefix, *in_strides, h, n, k_end, params.block_size,
             scale * _log2e(), scale),
            **common,
        )
    launch(
        choice, lambda META: flat_grid(cdiv(k_end, META["BLOCK_N"]), b * h),
        (q, k, v, do, lse, delta, dk, dv, dq_acc, sem, prefix, *in_strides, h, n, k_end, pow2(n),
         params.block_size, scale * _log2e(), scale),
        DETERMINISTIC=params.deterministic, DQ_KEY_MAJOR=table_arch(q.device) >= 90, FLAT=flat_launch(b * h),
        **common,
    )
    dq.copy_(dq_acc.view(b, h, n, d).mul_(scale))  # one pass: scale and cast into dq's strides
    return dq, dk, dv


@torch._dynamo.assume_constant_result  # a constant to Dynamo: it imports the kernel module when it must
def _fused_fits(head_dim: int, fp32: bool, n: int, arch: int) -> bool:
    return kernels("attention").fused_backward_fits(head_dim, fp32, n, arch)


def fused_backward_fits(head_dim: int, dtype: torch.dtype, n: int, device: torch.device) -> bool:
    """Whether the fused one-program-per-head backward keeps a head's padded (N, D) K, V tile on chip."""
    return _fused_fits(head_dim, dtype == torch.float32, n, table_arch(device))


def backward_path(head_dim: int, dtype: torch.dtype, n: int, device: torch.device, policy: LaunchPolicy) -> str:
    """The policy's attention backward ("fused" | "split") for one problem: decided at forward time."""
    fits = fused_backward_fits(head_dim, dtype, n, device)
    if policy.attention_backward == "auto":
        return "fused" if fits else "split"
    # Under the interpreter there is no chip to fit on: tests run the fused path at any N.
    if policy.attention_backward == "fused" and not fits and not interpreting():
        raise ValueError(
            f"{OP}: LaunchPolicy(attention_backward='fused') needs a head's padded (N, D) tile on chip, but "
            f"N={n}, D={head_dim} ({dtype}) is too large; use 'auto' or 'split'"
        )
    return policy.attention_backward



# ------------------------------------------------------------------------------ custom ops + autograd
# layout "bhnd":   q, k, v (B, H, N, D) in; o (B, H, N, D) out (a view of (B, N, H, D) memory);
#        "packed": the (B, N, 3, H, D) qkv in place of q (k, v None); o (B, N, H, D) contiguous out, and the
#                  backward writes dq, dk, dv into one (B, N, 3, H, D) gradient of qkv.
LAYOUTS = ("bhnd", "packed")
_SCALARS = (AttentionParams, LaunchPolicy, ("layout", str))


def _qkv_views(layout: str, q, k, v) -> tuple:
    """The (B, H, N, D) q, k, v views of the ops' tensor arguments."""
    return unpack(q) if layout == "packed" else (q, k, v)


def _fwd(q, k, v, prefix_len, params: AttentionParams, policy: LaunchPolicy, layout: str) -> tuple:
    """-> (o, lse (B, H, N) fp32); q is the packed qkv for layout "packed"."""
    o, lse = launch_forward(*_qkv_views(layout, q, k, v), prefix_len, params, policy)
    return (o.transpose(1, 2) if layout == "packed" else o), lse  # packed: o's own contiguous memory


def _fwd_fake(q, k, v, prefix_len, params, policy, layout):
    q = _qkv_views(layout, q, k, v)[0]
    b, h, n, _ = q.shape
    o = _bhnd_empty(q)
    return (o.transpose(1, 2) if layout == "packed" else o), q.new_empty((b, h, n), dtype=torch.float32)


def _bwd(do, q, k, v, o, lse, prefix_len, params: AttentionParams, policy: LaunchPolicy, layout: str) -> tuple:
    """-> (dq, dk, dv) like q, k, v; for layout "packed" (dqkv (B, N, 3, H, D), empty, empty)."""
    if layout == "packed":
        dqkv = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        launch_backward(do.transpose(1, 2), *unpack(q), o.transpose(1, 2), lse, prefix_len, params, policy,
                        out=unpack(dqkv))
        return dqkv, q.new_empty((0,)), q.new_empty((0,))
    return launch_backward(do, q, k, v, o, lse, prefix_len, params, policy)


def _bwd_fake(do, q, k, v, o, lse, prefix_len, params, policy, layout):
    if layout == "packed":
        return q.new_empty(q.shape), q.new_empty((0,)), q.new_empty((0,))
    return _bhnd_empty(q), _bhnd_empty(k), _bhnd_empty(v)


attention_fwd = TypedOp("attention_fwd", ("q", "k?", "v?", "prefix_len?"), _SCALARS, "(Tensor, Tensor)",
                        _fwd, _fwd_fake)
attention_bwd = TypedOp("attention_bwd", ("do", "q", "k?", "v?", "o", "lse", "prefix_len?"), _SCALARS,
                        "(Tensor, Tensor, Tensor)", _bwd, _bwd_fake)


# setup_context keeps the forward's scalars and hands them to the backward op, so the backward runs with
# exactly what the forward decided, whatever policy is current when autograd gets to it.
def _setup_context(ctx, q, k, v, prefix_len, params, policy, layout, output):
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, prefix_len)
    ctx.scalars = (params, policy, layout)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, prefix_len = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, prefix_len, *ctx.scalars)
    if ctx.scalars[2] == "packed":
        dk = dv = None  # k, v were None: dq is the whole packed gradient
    return dq, dk, dv, None  # q, k, v, prefix_len


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- entries
def _kernel_call(q, prefix_len: Optional[torch.Tensor], params: AttentionParams, backward: Optional[str]) -> tuple:
    """(prefix_len, params, policy) as the kernels take them for a call on (B, H, N, D) ``q``: the mask as the
    kernels see it and the launch choices of the current LaunchPolicy; ``backward`` ("auto", "fused",
    "split") overrides its attention_backward (the dispatch candidates pin a path this way: a
    ``launch_policy`` block would set a ContextVar, which torch.compile cannot trace)."""
    b, h, n, d = q.shape
    check_interpretable_dtype(q, OP)
    is_causal = effective_causal(params.is_causal, params.block_size, n)
    if not is_causal:
        prefix_len = None  # every key is visible anyway
    elif prefix_len is not None:
        prefix_len = prefix_len.contiguous()  # the kernels read prefix_len[b] at stride 1
    policy = current_policy()
    if backward is not None:
        policy = LaunchPolicy(autotune=policy.autotune, attention_backward=backward)
    kernel_params = AttentionParams(is_causal=is_causal, block_size=params.block_size if is_causal else 1,
                                    scale=params.resolved_scale(d), deterministic=params.deterministic)
    policy = LaunchPolicy(autotune=policy.autotune, attention_backward=backward_path(d, q.dtype, n, q.device, policy))
    return prefix_len, kernel_params, policy


def attention_triton(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams,
                     backward: Optional[str] = None) -> torch.Tensor:
    """The Triton path on checked (B, H, N, D) q, k, v (prefix_len None or int32 (B,)) -> (B, H, N, D);
    ``backward`` as in ``_kernel_call``."""
    o, _ = attention_fwd(q, k, v, *_kernel_call(q, prefix_len, params, backward), "bhnd")
    return o


def attention_qkvpacked_triton(qkv, prefix_len: Optional[torch.Tensor], params: AttentionParams,
                               backward: Optional[str] = None) -> torch.Tensor:
    """The Triton path on a checked (B, N, 3, H, D) qkv -> (B, N, H, D) contiguous; the ops of attention."""
    o, _ = attention_fwd(qkv, None, None, *_kernel_call(unpack(qkv)[0], prefix_len, params, backward), "packed")
    return o
