"""`aimkern.attention`: block-causal raster-order attention with AIM's prefix, SDPA's (B, H, N, D) layout.

Backend dispatch, input checks, the Triton launchers (kernels/attention.py picks configs; the kernels are
in kernels/attention_fwd.py and kernels/attention_bwd.py), their custom-op registration
(``aimkern::attention_fwd``, ``aimkern::attention_bwd``) and the autograd wiring.

    forward:  o, lse = attention_fwd(q, k, v, prefix_len, call)   lse (B, H, N) fp32, natural log
    backward: dq, dk, dv = attention_bwd(do, q, k, v, o, lse, prefix_len, call)   deterministic, no atomics

``call`` is one str, the encoded ``AttentionCall`` (ops/_boundary.py): the mask as the kernels see it
(``AttentionParams``), the launch choices (``LaunchPolicy``: autotune, the fused or split backward) and the
layout. The forward's call is saved and handed to the backward op as it stands.

Outputs (o, dq, dk, dv) are (B, N, H, D) memory returned as (B, H, N, D) views: ``o.transpose(1, 2)`` is
then contiguous, so a ViT block's reshape to (B, N, H * D) before the output projection copies nothing.
Inputs are read through their strides (strided views of a packed qkv, stride-0 expanded gradients).

``attention_qkvpacked(qkv)`` takes the packed (B, N, 3, H, D) activation of a ViT block through the same two
ops (layout "packed": qkv in place of q, k and v None): the backward kernels write dq, dk, dv through
strides straight into one (B, N, 3, H, D) gradient, where ``attention`` on unbound views would make
autograd stack them into (3, B, H, N, D) and copy that again into the packed order.

Public launcher entry points (the custom ops run them; the compile gate drives them on meta tensors):
``launch_forward``, ``launch_backward``, ``backward_path``, ``fused_backward_fits`` and ``unpack``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..reference.attention import attention_reference
from ._checks import (
    autocast_inputs,
    check_float_dtype,
    check_same_device,
    check_backend_name,
    check_tensor,
    measured_auto,
    normalize_prefix_len,
    select_candidate,
    resolve_backend,
)
from ._boundary import crosses_boundary, decode, encode
from ._launch import LaunchPolicy, cdiv, current_policy, fixed_config, interpreting, kernels, launch, table_arch

OP = "attention"
_LOG2E = 1.4426950408889634  # the kernels use exp2: scores are pre-scaled by log2(e)


@crosses_boundary
@dataclass(frozen=True)
class AttentionParams:
    """Non-tensor options of one attention call."""

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


def _check_inputs(q, k, v, params: AttentionParams, backend: str, op: str = OP) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, op, ndim=4)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"{op}: q, k and v must have the same shape (B, H, N, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_same_device((("q", q), ("k", k), ("v", v)), op)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float_dtype(q, "q", op, "reference" if backend == "measured" else backend)
    n, d = q.shape[2], q.shape[3]
    if n < 1:
        raise ValueError(f"{op}: sequence length N must be >= 1, got {n}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"{op}: head dim D must be a multiple of 8 in [16, 256], got {d}")
    params.check(op)


def _bucket(n: int) -> int:
    """The autotuning key's sequence band: N rounded up to a power of two."""
    return 1 << max(0, n - 1).bit_length()


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


def flat_launch(bh: int) -> bool:
    """Whether a launch for ``bh`` = B * H heads takes the flat grid (the kernels' FLAT constexpr)."""
    return bh > FLAT_ABOVE


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
# (aimkern/ops/specs/attention.py's gate problems) drives on meta tensors. ``params`` are the kernels' view
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
        (*tensors, *strides, h, n, split, _bucket(n), params.block_size, scale * _LOG2E),
        dtype=q.dtype, policy=policy, **flags,
    )
    if split < n:
        launch(
            kern.forward_tail(d, fp32), lambda META: flat_grid(cdiv(n - split, META["BLOCK_M"]), b * h),
            (*tensors, *strides, h, n, split, params.block_size, scale * _LOG2E),
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
             h, n, params.block_size, scale * _LOG2E, scale),
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
             scale * _LOG2E, scale),
            **common,
        )
    launch(
        choice, lambda META: flat_grid(cdiv(k_end, META["BLOCK_N"]), b * h),
        (q, k, v, do, lse, delta, dk, dv, dq_acc, sem, prefix, *in_strides, h, n, k_end, _bucket(n),
         params.block_size, scale * _LOG2E, scale),
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
LAYOUTS = ("bhnd", "packed")


@crosses_boundary
@dataclass(frozen=True)
class AttentionCall:
    """The non-tensor argument of both attention custom ops, encoded into one str (ops/_boundary.py).

    params: as the kernels see them (``_call``): is_causal only where a causal block is shorter than N
            (block_size 1 otherwise), scale a float.
    policy: the LaunchPolicy current at the forward, attention_backward resolved to "fused" or "split".
    layout: "bhnd":   q, k, v (B, H, N, D) in; o (B, H, N, D) out (a view of (B, N, H, D) memory);
            "packed": the (B, N, 3, H, D) qkv in place of q (k, v None); o (B, N, H, D) contiguous out,
                      and the backward writes dq, dk, dv into one (B, N, 3, H, D) gradient of qkv.
    """

    params: AttentionParams
    policy: LaunchPolicy
    layout: str = "bhnd"


def _qkv_views(call: AttentionCall, q, k, v) -> tuple:
    """The (B, H, N, D) q, k, v views of the ops' tensor arguments."""
    return unpack(q) if call.layout == "packed" else (q, k, v)


# Both ops take the call as one encoded str; setup_context keeps that str and hands it to the backward op,
# so the backward runs with exactly what the forward decided, whatever policy is current when autograd
# gets to it.
@torch.library.custom_op("aimkern::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], prefix_len: Optional[torch.Tensor],
    call: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o, lse (B, H, N) fp32); q is the packed qkv for layout "packed" (see ``AttentionCall``)."""
    c = decode(call)
    o, lse = launch_forward(*_qkv_views(c, q, k, v), prefix_len, c.params, c.policy)
    return (o.transpose(1, 2) if c.layout == "packed" else o), lse  # packed: o's own contiguous memory


@_attention_fwd.register_fake
def _(q, k, v, prefix_len, call):
    c = decode(call)
    q = _qkv_views(c, q, k, v)[0]
    b, h, n, _ = q.shape
    o = _bhnd_empty(q)
    return (o.transpose(1, 2) if c.layout == "packed" else o), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("aimkern::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], o: torch.Tensor,
    lse: torch.Tensor, prefix_len: Optional[torch.Tensor], call: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) like q, k, v; for layout "packed" (dqkv (B, N, 3, H, D), empty, empty)."""
    c = decode(call)
    if c.layout == "packed":
        dqkv = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        launch_backward(do.transpose(1, 2), *unpack(q), o.transpose(1, 2), lse, prefix_len, c.params, c.policy,
                        out=unpack(dqkv))
        return dqkv, q.new_empty((0,)), q.new_empty((0,))
    return launch_backward(do, q, k, v, o, lse, prefix_len, c.params, c.policy)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, prefix_len, call):
    if decode(call).layout == "packed":
        return q.new_empty(q.shape), q.new_empty((0,)), q.new_empty((0,))
    return _bhnd_empty(q), _bhnd_empty(k), _bhnd_empty(v)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_len, call = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, prefix_len)
    ctx.call = call
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, prefix_len = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, prefix_len, ctx.call)
    if decode(ctx.call).layout == "packed":
        dk = dv = None  # k, v were None: dq is the whole packed gradient
    return dq, dk, dv, None, None  # q, k, v, prefix_len, call


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _call(q, prefix_len: Optional[torch.Tensor], params: AttentionParams, layout: str,
          backward: Optional[str] = None) -> tuple:
    """(prefix_len for the kernels, the encoded ``AttentionCall``) of a call on (B, H, N, D) ``q``: the
    mask as the kernels see it and the launch choices of the current LaunchPolicy; ``backward`` ("auto",
    "fused", "split") overrides its attention_backward (the dispatch candidates pin a path this way: a
    ``launch_policy`` block would set a ContextVar, which torch.compile cannot trace)."""
    b, h, n, d = q.shape
    if interpreting() and not q.is_cuda and q.dtype == torch.bfloat16:
        raise TypeError(
            f"{OP}: bfloat16 is not supported under Triton's interpreter (its bf16 tl.dot is wrong); "
            "use float16 / float32 on CPU, or run bfloat16 on a CUDA GPU"
        )
    is_causal = params.is_causal and params.block_size < n  # one causal block spanning N is full attention
    if not is_causal:
        prefix_len = None  # every key is visible anyway
    elif prefix_len is not None:
        prefix_len = prefix_len.contiguous()  # the kernels read prefix_len[b] at stride 1
    policy = current_policy()
    if backward is not None:
        policy = LaunchPolicy(autotune=policy.autotune, attention_backward=backward)
    kernel_params = AttentionParams(is_causal=is_causal, block_size=params.block_size if is_causal else 1,
                                    scale=params.resolved_scale(d), deterministic=params.deterministic)
    launch = LaunchPolicy(autotune=policy.autotune,
                          attention_backward=backward_path(d, q.dtype, n, q.device, policy))
    return prefix_len, encode(AttentionCall(params=kernel_params, policy=launch, layout=layout))


def _resolve(q, k, v, params: AttentionParams, backend: str, prefix_len, op: str) -> tuple:
    """(backend, prefix_len as None or an int32 (B,) tensor) for (B, H, N, D) q, k, v, after every check.
    backend "measured": ``aimkern.dispatch`` chooses (inputs checked as for the reference, which takes the
    most dtypes; each candidate says what it supports)."""
    check_backend_name(backend, op)
    be = "measured" if measured_auto(backend) else resolve_backend(backend, q, op)
    _check_inputs(q, k, v, params, be, op=op)
    return be, normalize_prefix_len(prefix_len, q.shape[0], q.shape[2], q.device, op)


def _reference(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams) -> torch.Tensor:
    return attention_reference(
        q, k, v, is_causal=params.is_causal, block_size=params.block_size, prefix_len=prefix_len, scale=params.scale
    )


def _attention_triton(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams,
                      backward: Optional[str] = None) -> torch.Tensor:
    """The Triton path on (B, H, N, D) q, k, v -> (B, H, N, D); ``backward`` as in ``_call``."""
    prefix_len, call = _call(q, prefix_len, params, "bhnd", backward)
    o, _ = _attention_fwd(q, k, v, prefix_len, call)
    return o


def _attention_qkvpacked_triton(qkv, prefix_len: Optional[torch.Tensor], params: AttentionParams,
                                backward: Optional[str] = None) -> torch.Tensor:
    """The Triton path on a (B, N, 3, H, D) qkv -> (B, N, H, D) contiguous; the same op as ``attention``."""
    prefix_len, call = _call(unpack(qkv)[0], prefix_len, params, "packed", backward)
    o, _ = _attention_fwd(qkv, None, None, prefix_len, call)
    return o


def _measured(q, k, v, prefix_len: Optional[torch.Tensor], params: AttentionParams):
    """The candidate ``aimkern.dispatch`` chooses for this call, and the options it is called with."""
    options = dict(is_causal=params.is_causal, block_size=params.block_size, scale=params.scale,
                   deterministic=params.deterministic)
    return select_candidate(OP, (q, k, v, prefix_len), options, q.dtype), options


OP_PACKED = "attention_qkvpacked"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention with AIM's masks; a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        q, k, v: (B, H, N, D), fp16 / bf16 / fp32 (float64 on the reference backend), any strides.
            N >= 1; D a multiple of 8 in [16, 256].
        is_causal: False for full attention; True for raster-order (block-)causal attention.
        block_size: with is_causal, query i sees key j when j // block_size <= i // block_size.
        prefix_len: None, an int, or an int tensor (B,) with values in [0, N]: the first prefix_len[b]
            tokens of sample b are visible to every query (AIM's prefix-causal attention).
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (the fastest correct path, measured on first use: aimkern.dispatch), "triton" or
            "reference".
        deterministic: True (default): gradients are bit-identical run to run (the long-N backward adds
            its dQ shares in a fixed order). False lets them land in any order (fp32 atomics): a little
            faster where many key tiles share a query tile, with run-to-run differences at round-off level.
            The forward and the short-N backward are deterministic either way.

    Returns:
        (B, H, N, D) in the input dtype.

    Visibility for N = 6, is_causal=True, block_size=2, prefix_len=3 (x = visible)::

        keys ->   0 1 2 3 4 5
        query 0   x x x . . .
        query 1   x x x . . .
        query 2   x x x x . .
        query 3   x x x x . .
        query 4   x x x x x x
        query 5   x x x x x x
    """
    params = AttentionParams(is_causal=is_causal, block_size=block_size, scale=scale, deterministic=deterministic)
    check_tensor(q, "q", OP)
    q, k, v = autocast_inputs(q, k, v)
    be, prefix = _resolve(q, k, v, params, backend, prefix_len, OP)
    if be == "measured":
        cand, options = _measured(q, k, v, prefix, params)
        return cand.fn(q, k, v, prefix_len=prefix, **options)
    if be == "reference":
        return _reference(q, k, v, prefix, params)
    return _attention_triton(q, k, v, prefix, params)


def attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    is_causal: bool = False,
    block_size: int = 1,
    prefix_len: Union[None, int, torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """``attention`` on a ViT block's packed qkv activation, returning the (B, N, H, D) layout it needs next.

    Args:
        qkv: (B, N, 3, H, D), any strides (e.g. ``linear(x).view(B, N, 3, H, D)``); q, k, v are
            ``qkv[:, :, 0]``, ``qkv[:, :, 1]``, ``qkv[:, :, 2]``. Dtypes, N and D as in ``attention``.
        is_causal, block_size, prefix_len, scale, backend, deterministic: as in ``attention``.

    Returns:
        (B, N, H, D) in the input dtype; contiguous on the Triton backend, so ``.reshape(B, N, H * D)``
        before the output projection is free. The same values as
        ``attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), ...).transpose(1, 2)``, but the gradient of qkv
        is one (B, N, 3, H, D) tensor written by the kernels (no stack of dq, dk, dv and no copy of it).
    """
    params = AttentionParams(is_causal=is_causal, block_size=block_size, scale=scale, deterministic=deterministic)
    check_tensor(qkv, "qkv", OP_PACKED, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"{OP_PACKED}: qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)} (dim 2 is not 3)")
    (qkv,) = autocast_inputs(qkv)
    q, k, v = unpack(qkv)
    be, prefix = _resolve(q, k, v, params, backend, prefix_len, OP_PACKED)
    if be == "measured":  # the choice of attention on the unpacked views; a packed variant where it has one
        cand, options = _measured(q, k, v, prefix, params)
        if "packed" in cand.extra:
            return cand.extra["packed"](qkv, prefix_len=prefix, **options)
        return cand.fn(q, k, v, prefix_len=prefix, **options).transpose(1, 2)
    if be == "reference":
        return _reference(q, k, v, prefix, params).transpose(1, 2)
    return _attention_qkvpacked_triton(qkv, prefix, params)

