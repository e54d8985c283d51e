"""The spec of ``aimkern.linear_cross_entropy``.

Candidates:

    triton       aimkern's fused head: logits tile by tile, never the (tokens, V) matrix; with a gradient,
                 loss and gradients in one pass (3 GEMM-equivalents)
    chunked      F.linear + F.cross_entropy over token chunks, each chunk recomputed in the backward
                 (torch.utils.checkpoint), so at most one chunk's logits live at a time
    torch-fused  torch's own F.linear_cross_entropy (torch >= 2.13; chunked with LinearCrossEntropyOptions
                 where torch has them), without z-loss
    reference    F.linear + F.cross_entropy on the whole (tokens, V) logits
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...reference.cross_entropy import linear_cross_entropy_reference
from .._boundary import encode
from .._checks import interpreter_dtype_problem
from .._launch import LaunchPolicy, interpreting
from ..spec import Candidate, OpSpec, Problem, Tolerance, add_spec
from .common import GATE_DTYPES, gate_dtypes, meta, pow2, problem, randint, randn

# The module, not the function: aimkern.ops binds the name 'cross_entropy' to the public op where they share it.
op = importlib.import_module("aimkern.ops.cross_entropy")

# Benchmark shapes and peers (benchmarks/cross_entropy.py through benchmarks/harness.py): AIM's 8192-way
# token head; peers map a label to a candidate, or "backend=triton" for the public op on aimkern's path.
BENCH = {
    "shapes": [dict(T=t, E=e, V=8192) for t in (8192, 65536, 262144) for e in (768, 1024, 1536)],
    "quick": [dict(T=t, E=768, V=8192) for t in (8192, 65536)],
    "cpu": [dict(T=256, E=64, V=1024)],
    "peers": {"aimkern": "backend=triton", "eager fp32 logits": "reference", "chunked fp32 logits": "chunked",
              "torch fused": "torch-fused"},
}

CHUNK_TOKENS = 4096  # the chunked candidate's tokens per chunk: 4096 x 8192 fp32 logits = 128 MiB


def _float_dtypes_match(problem: Problem) -> Optional[str]:
    for i, name in ((1, "linear_weight"), (3, "linear_bias")):
        if problem.shapes[i] is not None and problem.dtype_of(i) != problem.dtype_of(0):
            return f"needs {name} in input's dtype"
    return None


def _triton_unsupported(problem: Problem) -> Optional[str]:
    if problem.device_type == "cpu" and not interpreting():
        return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"{problem.dtype} is not a kernel dtype"
    return interpreter_dtype_problem(problem.dtype, problem.device_type) or _float_dtypes_match(problem)


def _triton(input, linear_weight, target, *, linear_bias=None, **options):
    return op._linear_cross_entropy_triton(input, linear_weight, target, linear_bias, op.CrossEntropyParams(**options))


def _chunk_losses(x, w, b, t, ignore_index: int, label_smoothing: float, z_loss: float):
    """Per-token loss (T,) fp32 of one chunk, zero where ignored."""
    logits = F.linear(x, w, b).float()
    loss = F.cross_entropy(logits, t, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss:  # where, not a 0/1 product: with every token ignored, "mean"'s 1/0 upstream would give inf * 0
        z = torch.logsumexp(logits, dim=-1).square()
        loss = loss + z_loss * torch.where(t != ignore_index, z, torch.zeros_like(z))
    return loss


def _chunked(input, linear_weight, target, *, linear_bias=None, reduction="mean", ignore_index=-100,
             label_smoothing=0.0, z_loss=0.0):
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    parts = []
    for t0 in range(0, x.shape[0], CHUNK_TOKENS):
        args = (x[t0:t0 + CHUNK_TOKENS], linear_weight, linear_bias, t[t0:t0 + CHUNK_TOKENS],
                ignore_index, label_smoothing, z_loss)
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args[:3] if a is not None)
        parts.append(checkpoint(_chunk_losses, *args, use_reentrant=False) if grad else _chunk_losses(*args))
    loss = torch.cat(parts) if parts else x.new_zeros((0,), dtype=torch.float32)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != ignore_index).sum()


def _torch_fused(input, linear_weight, target, *, linear_bias=None, reduction="mean", ignore_index=-100,
                 label_smoothing=0.0, z_loss=0.0):
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kwargs = dict(linear_bias=linear_bias, reduction=reduction, ignore_index=ignore_index,
                  label_smoothing=label_smoothing)
    if options is not None:
        kwargs["options"] = options()
    x = input.reshape(-1, input.shape[-1])  # it takes (T, E) and (T,)
    loss = F.linear_cross_entropy(x, linear_weight, target.reshape(-1).long(), **kwargs).float()
    return loss.reshape(target.shape) if reduction == "none" else loss


def _torch_fused_unsupported(problem: Problem) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    if problem.option("z_loss", 0.0):
        return "torch's F.linear_cross_entropy has no z-loss"
    if problem.dtype == "float16" and problem.grad:
        # Its loss is fp16, so autograd hands the backward the upstream gradient in fp16: a GradScaler's first
        # scale, 65536, becomes inf and every gradient NaN.
        return "returns an fp16 loss: a GradScaler's 65536 upstream overflows to inf in its backward"
    return _float_dtypes_match(problem)


def _reference(input, linear_weight, target, *, linear_bias=None, **options):
    return linear_cross_entropy_reference(input, linear_weight, target, linear_bias=linear_bias, **options)


def mask_kind(problem: Problem) -> str:
    parts = [problem.option("reduction", "mean")]
    parts += ["ls"] if problem.option("label_smoothing", 0.0) else []
    parts += ["z"] if problem.option("z_loss", 0.0) else []
    parts += ["bias"] if problem.shapes[3] is not None else []
    return "+".join(parts)


def band(problem: Problem) -> str:
    tokens = 1
    for s in problem.shapes[2]:
        tokens *= s
    v, e = problem.shapes[1]
    return f"t<={pow2(tokens)}|v{v}|e{e}"


def small_problem(problem: Problem) -> Problem:
    """37 tokens (a ragged tile), the same vocabulary, width, dtype and options."""
    v, e = problem.shapes[1]
    shapes = list(problem.shapes)
    shapes[0], shapes[2] = (37, e), (37,)
    return problem.with_(shapes=tuple(shapes))


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    v, e = problem.shapes[1]
    x, w, b = randn(problem, 0, gen), randn(problem, 1, gen, e**-0.5), randn(problem, 3, gen)
    target = randint(problem, 2, 0, v, gen)
    ignore = problem.option("ignore_index", -100)
    drop = torch.rand(target.shape, generator=gen) < 0.1  # about one token in ten ignored
    target = torch.where(drop.to(target.device), torch.full_like(target, ignore), target)
    return x, w, target, b


def _call_layout(tensors: tuple, options: dict) -> tuple:
    x, w, target, b = tensors
    return (x, w, target), dict(options, linear_bias=b)


def gate_problems(subset: str):
    """(label, thunk) pairs driving the cross-entropy launchers on meta tensors: a ViT-scale head (the
    autotuned big tiles) and a small one, each dtype, bias and label smoothing on / off; forward, backward
    and the forward-with-gradient path (logits stored, dlogits in place)."""
    shapes = {"65536x768 V=8192": (65536, 8192, 768), "small": (300, 512, 80)}
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        for sname, (t, v, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                for smoothing in (0.0, 0.1) if dname == "bf16" else (0.1,):
                    if subset == "gpu-run" and smoothing:
                        continue

                    def run(dtype=dtype, t=t, v=v, e=e, bias=bias, smoothing=smoothing):
                        x, w = meta(t, e, dtype=dtype), meta(v, e, dtype=dtype)
                        b = meta(v, dtype=dtype) if bias else None
                        tgt = meta(t, dtype=torch.int64)
                        params = op.CrossEntropyParams("mean", -100, smoothing, 1e-4)
                        policy = LaunchPolicy()
                        lse, _, _ = op.launch_forward(x, w, b, tgt, params, policy)
                        grad = meta(1, dtype=torch.float32).expand(t)
                        op.launch_backward(grad, x, w, b, tgt, lse, params, True, True, bias, policy)
                        _, dx, _, _, scale = op.launch_forward_with_grad(x, w, b, tgt, params, True, True, bias,
                                                                         policy)
                        op.launch_scale(dx, meta(1, dtype=torch.float32).reshape(()), scale, dtype, policy)

                    yield f"cross_entropy {dname} {sname} bias={bias} smoothing={smoothing}", run


# ---------------------------------------------------------------------------------- contract tests
def _problem(dtype: str, lead: tuple, v: int, e: int, bias: bool, grad: bool, **options) -> Problem:
    opts = dict(reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0)
    opts.update(options)
    return problem("linear_cross_entropy", dtype, ((*lead, e), (v, e), lead, (v,) if bias else None), opts,
                   (grad, grad, False, bias and grad), (None, None, "int64", None))


def examples(dtype: str) -> list:
    """V = 300 and 517 (no tile divides them), leading dims (2, 37) = 74 tokens (two backward chunks under
    the interpreter), every reduction (the forward-with-gradient op, and the per-token op + backward op),
    label smoothing, z-loss, bias on and off, and no gradient."""
    return [
        _problem(dtype, (2, 37), 517, 48, True, True, label_smoothing=0.1, z_loss=1e-3),
        _problem(dtype, (19,), 300, 80, False, True, reduction="none", z_loss=1e-2),
        _problem(dtype, (13,), 300, 48, True, True, reduction="sum", label_smoothing=0.2),
        _problem(dtype, (5,), 300, 48, True, False),
    ]


def empty_batch(dtype: str) -> Problem:
    # "sum": a mean over no token is NaN (0 / 0), like F.cross_entropy, and NaN equals nothing.
    return _problem(dtype, (0,), 300, 48, True, True, reduction="sum")


def custom_ops() -> list:
    """opcheck samples of the four cross-entropy ops: per-token forward + backward, forward-with-gradient
    and the fp32 scaling of its saved gradients."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(11, 48, generator=gen), torch.randn(300, 48, generator=gen) * 0.2, torch.randn(300, generator=gen)
    tgt = torch.randint(0, 300, (11,), generator=gen)
    tgt[3] = -100
    params = op.CrossEntropyParams(label_smoothing=0.1, z_loss=1e-3)
    policy = LaunchPolicy(autotune=False)
    leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
    fwd = encode(op.CrossEntropyCall(params=params, policy=policy))
    needs = dict(need_dx=True, need_dw=True, need_db=True)
    out = [("linear_cross_entropy_fwd", torch.ops.aimkern.linear_cross_entropy_fwd, (*leaves, tgt, fwd))]
    with torch.no_grad():
        _, lse = torch.ops.aimkern.linear_cross_entropy_fwd(x, w, b, tgt, fwd)
    grad = torch.full((), 0.5).expand(11)  # a stride-0 per-token gradient, as the gradient of .sum() is
    bwd = encode(op.CrossEntropyCall(params=params, policy=policy, **needs))
    out.append(("linear_cross_entropy_bwd", torch.ops.aimkern.linear_cross_entropy_bwd, (grad, x, w, b, tgt, lse, bwd)))
    for reduction in ("mean", "sum"):
        call = encode(op.CrossEntropyCall(params=op.CrossEntropyParams(reduction=reduction), policy=policy, **needs))
        out.append((f"linear_cross_entropy_fwd_grad {reduction}", torch.ops.aimkern.linear_cross_entropy_fwd_grad,
                    (*leaves, tgt, call)))
    src = torch.randn(7, 5, generator=gen)
    out.append(("linear_cross_entropy_scale", torch.ops.aimkern.linear_cross_entropy_scale,
                (src, torch.tensor(65536.0), torch.tensor(1.0 / 37), torch.float16, call)))
    return out


SPEC = add_spec(OpSpec(
    name="linear_cross_entropy",
    tensor_args=("input", "linear_weight", "target", "linear_bias"),
    grad_args=("input", "linear_weight", "linear_bias"),
    reference=_reference,
    candidates=[
        Candidate("triton", _triton, "aimkern", _triton_unsupported, interpreted=True),
        Candidate("chunked", _chunked, "torch", _float_dtypes_match),
        Candidate("torch-fused", _torch_fused, "torch", _torch_fused_unsupported),
        Candidate("reference", _reference, "torch"),
    ],
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    band=band,
    call_layout=_call_layout,
    tolerance=Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}),
    bench=BENCH,
    gate_problems=gate_problems,
    family="cross_entropy",
    custom_ops=custom_ops,
    examples=examples,
    empty_batch=empty_batch,
))
