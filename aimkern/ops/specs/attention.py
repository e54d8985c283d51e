"""The spec of ``aimkern.attention``: its candidates, problems, key parts and tolerance.

Candidates (each a forward + the backward autograd takes through it):

    triton-fused          aimkern's one-program-per-head backward (where a head's K, V fit on chip)
    triton-split          the tiled dK/dV + dQ backward, dQ shares added in a fixed order (the forward alone
                          when nothing needs a gradient)
    triton-split-atomic   the same, dQ shares added by fp32 atomics: only when the call says deterministic=False
    sdpa-cudnn / -flash / -efficient / -math   F.scaled_dot_product_attention pinned to one backend (CUDA);
                          is_causal=True for token-causal, a boolean (B, 1, N, N) mask for block and prefix
    sdpa                  F.scaled_dot_product_attention as torch picks it (CPU)
    reference             aimkern.reference.attention_reference (einsum, softmax in fp32)
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from ...reference.attention import attention_mask, attention_reference
from .._boundary import encode
from .._launch import LaunchPolicy, interpreting
from ..spec import Candidate, OpSpec, Problem, Tolerance, add_spec
from .common import GATE_DTYPES, gate_dtypes, meta, pow2, problem, randint, randn, seq_band

# The module, not the function: aimkern.ops binds the name 'attention' to the public op where they share it.
op = importlib.import_module("aimkern.ops.attention")

# Benchmark shapes and peers (benchmarks/attn_throughput.py through benchmarks/harness.py): the peer table's
# shapes of benchmarks/RESULTS.md (65,536 tokens per call). Peers map a label to a candidate, "(candidate,
# options)" or "backend=triton" (the public op on aimkern's path); SDPA's backwards add dQ with atomics, so
# they are timed as deterministic=False.
BENCH = {
    "heads": 12,
    "shapes": [dict(B=256, N=256, D=64), dict(B=256, N=196, D=64), dict(B=64, N=1024, D=64),
               dict(B=16, N=4096, D=64), dict(B=64, N=1024, D=128)],
    "quick": [dict(B=256, N=256, D=64), dict(B=256, N=196, D=64), dict(B=64, N=1024, D=128)],
    "cpu": [dict(B=1, N=64, D=16)],
    "masks": ["full", "causal", "prefix", "block"],
    "quick_masks": ["causal", "prefix", "block"],
    "peers": {"aimkern": "backend=triton", "aimkern split bwd": "triton-split",
              "SDPA cuDNN": ("sdpa-cudnn", {"deterministic": False}),
              "SDPA FA2": ("sdpa-flash", {"deterministic": False}),
              "SDPA mem-eff + mask": ("sdpa-efficient", {"deterministic": False})},
}

TENSORS = ("q", "k", "v", "prefix_len")


def _effective(problem: Problem) -> tuple:
    """(causal, block_size, has_prefix) as the kernels see them: one causal block spanning N is full."""
    n = problem.shapes[0][2]
    causal = bool(problem.option("is_causal")) and problem.option("block_size", 1) < n
    return causal, (problem.option("block_size", 1) if causal else 1), causal and problem.shapes[3] is not None


def mask_kind(problem: Problem) -> str:
    causal, block, prefix = _effective(problem)
    if not causal:
        return "full"
    kind = "causal" if block == 1 else "block"
    return f"prefix-{kind}" if prefix else kind


def band(problem: Problem) -> str:
    b, h, n, d = problem.shapes[0]
    return f"bh<={pow2(b * h)}|n{seq_band(n)}|d{d}"


def small_problem(problem: Problem) -> Problem:
    """2 x 2 heads, N up to 97 (tails in every tile), the same D, dtype and mask kind."""
    b, h, n, d = problem.shapes[0]
    b2, h2, n2 = min(b, 2), min(h, 2), min(n, 97)
    options = problem.kwargs()
    causal, block, _ = _effective(problem)
    if causal and block >= n2:
        options["block_size"] = max(2, n2 // 2)
    qshape = (b2, h2, n2, d)
    return problem.with_(shapes=(qshape, qshape, qshape, (b2,) if problem.shapes[3] is not None else None),
                         options=options)


def make_inputs(problem: Problem, gen: torch.Generator) -> tuple:
    q, k, v = (randn(problem, i, gen) for i in range(3))
    return q, k, v, randint(problem, 3, 0, problem.shapes[0][2] + 1, gen)


def _call_layout(tensors: tuple, options: dict) -> tuple:
    q, k, v, prefix = tensors
    return (q, k, v), dict(options, prefix_len=prefix)


# ------------------------------------------------------------------------------------------- Triton paths
def _triton_unsupported(problem: Problem) -> Optional[str]:
    if problem.device_type == "cpu":
        if not interpreting():
            return "Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)"
        if problem.dtype == "bfloat16":
            return "bfloat16 is wrong under Triton's interpreter"
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"{problem.dtype} is not a kernel dtype"
    return None


def _fused_unsupported(problem: Problem):
    if not problem.grad:
        return "no backward to choose (the forward is triton-split's)"
    if problem.device_type == "cuda":
        _, _, n, d = problem.shapes[0]
        if not op.fused_backward_fits(d, problem.torch_dtype, n, torch.device(problem.device)):
            return f"a head's (N={n}, D={d}) tile does not fit on chip"
    return _triton_unsupported(problem)


def _atomic_unsupported(problem: Problem):
    if not problem.grad:
        return "no backward to choose (the forward is triton-split's)"
    if problem.option("deterministic", True):
        return "adds dQ with atomics: only for deterministic=False"
    return _triton_unsupported(problem)


def _triton(backward: str, deterministic: Optional[bool] = None):
    """A Triton candidate: the aimkern kernels with one backward path (``deterministic`` overrides the call's).
    The path is passed down, not set with ``launch_policy``: torch.compile cannot trace a ContextVar.set()."""

    def run(q, k, v, *, prefix_len=None, deterministic_=deterministic, **options):
        return op._attention_triton(q, k, v, prefix_len, _params(options, deterministic_), backward)

    def packed(qkv, *, prefix_len=None, deterministic_=deterministic, **options):
        return op._attention_qkvpacked_triton(qkv, prefix_len, _params(options, deterministic_), backward)

    return run, packed


def _params(options: dict, deterministic: Optional[bool]) -> "op.AttentionParams":
    if deterministic is not None:
        options = dict(options, deterministic=deterministic)
    return op.AttentionParams(**options)


# -------------------------------------------------------------------------------------------- torch paths
_SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _sdpa(backend: Optional[str]):
    def run(q, k, v, *, is_causal=False, block_size=1, prefix_len=None, scale=None, deterministic=True):
        n = q.shape[2]
        causal = is_causal and block_size < n
        mask, token_causal = None, False
        if causal and block_size == 1 and prefix_len is None:
            token_causal = True
        elif causal:
            mask = attention_mask(n, is_causal=True, block_size=block_size, prefix_len=prefix_len,
                                  batch=q.shape[0], device=q.device)
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
            ctx = sdpa_kernel(which)
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=token_causal, scale=scale)

    return run


def _sdpa_unsupported(backend: str):
    def rule(problem: Problem):
        if problem.dtype not in ("float16", "bfloat16", "float32"):
            return f"{problem.dtype} is not an SDPA kernel dtype"
        if backend in ("cudnn", "flash"):
            if problem.dtype == "float32":
                return f"SDPA's {backend} backend takes 16-bit inputs only"
            if mask_kind(problem) not in ("full", "causal"):
                return f"SDPA's {backend} backend takes no explicit mask ({mask_kind(problem)} needs one)"
        if backend != "math" and problem.grad and problem.option("deterministic", True):
            return f"SDPA's {backend} backward adds dQ with atomics: only for deterministic=False"
        return None

    return rule


def _reference(q, k, v, *, is_causal=False, block_size=1, prefix_len=None, scale=None, deterministic=True):
    return attention_reference(q, k, v, is_causal=is_causal, block_size=block_size, prefix_len=prefix_len,
                               scale=scale)


def _candidates() -> list:
    fused, fused_packed = _triton("fused")
    split, split_packed = _triton("split")
    atomic, atomic_packed = _triton("split", deterministic=False)
    out = [
        Candidate("triton-fused", fused, "aimkern", _fused_unsupported, interpreted=True,
                  extra={"packed": fused_packed}),
        Candidate("triton-split", split, "aimkern", _triton_unsupported, interpreted=True,
                  extra={"packed": split_packed}),
        Candidate("triton-split-atomic", atomic, "aimkern", _atomic_unsupported, interpreted=True,
                  extra={"packed": atomic_packed}),
    ]
    out += [Candidate(f"sdpa-{b}", _sdpa(b), "torch", _sdpa_unsupported(b), devices=("cuda",)) for b in _SDPA_BACKENDS]
    out.append(Candidate("sdpa", _sdpa(None), "torch", _sdpa_unsupported("math"), devices=("cpu",)))
    out.append(Candidate("reference", _reference, "torch"))
    return out


# ------------------------------------------------------------------------------------ compile gate
def gate_problems(subset: str):
    """(label, thunk) pairs driving the attention launchers on meta tensors, packed (B, N, 3, H, D) qkv as a
    ViT block has (q, k, v strided views, the gradient written into one packed buffer).

    Every table entry is reached by bf16 with the most general mask (causal + prefix) at D = 64, 80, 128,
    256 and N in both bands; the other mask variants at D = 64, fp16 and fp32 at D = 64 and 128 (the
    compile budget of CI: a full product would be ~5x the compiles for near-identical code)."""
    masks = {"full": (False, None), "causal": (True, None), "prefix": (True, "prefix")}
    qdev = torch.device("meta")
    for dname in gate_dtypes(subset):
        dtype = GATE_DTYPES[dname]
        dims = (64, 80, 128, 256) if dname == "bf16" and subset != "gpu-run" else (64, 128)
        for d in dims:
            for n in (196, 256, 1024):
                for mname, (causal, prefix) in masks.items():
                    if mname != "prefix" and (dname != "bf16" or d != 64):
                        continue
                    paths = ["split"]
                    if op.fused_backward_fits(d, dtype, n, qdev):
                        paths.append("fused")
                    for path in paths:
                        def run(dtype=dtype, d=d, n=n, causal=causal, prefix=prefix, path=path):
                            _gate_run(2, n, 4, d, dtype, prefix, causal, 4 if causal else 1, d**-0.5, path)

                        yield f"attention {dname} D={d} N={n} {mname} {path}", run
    # N = 224 = 3 x 64 + 32: the tiled backward's 32-key tail tile (196 reaches the 16-key one).
    yield "attention bf16 D=64 N=224 prefix split", lambda: _gate_run(
        2, 224, 4, 64, torch.bfloat16, "prefix", True, 1, 0.125, "split")
    # The fused backward at every on-chip head size it accepts (one to three 64-row key tiles), bf16 causal +
    # prefix; the GPU run meets it at three (the benchmark shapes, 196 and 256, take the tiled backward).
    for n in ((192,) if subset == "gpu-run" else (16, 64, 128, 192)):
        def run_small(n=n):
            if op.fused_backward_fits(64, torch.bfloat16, n, qdev):  # (no launch where it does not fit)
                _gate_run(2, n, 4, 64, torch.bfloat16, "prefix", True, 1, 0.125, "fused")

        yield f"attention bf16 D=64 N={n} prefix fused", run_small


def _gate_run(b, n, h, d, dtype, prefix, causal, block_size, scale, path) -> None:
    """Forward + backward of one packed-qkv problem through the public launchers."""
    qkv = meta(b, n, 3, h, d, dtype=dtype)
    q, k, v = op.unpack(qkv)
    pre = meta(b, dtype=torch.int32) if prefix else None
    params = op.AttentionParams(is_causal=causal, block_size=block_size, scale=scale)
    policy = LaunchPolicy(attention_backward=path)
    o, lse = op.launch_forward(q, k, v, pre, params, policy)
    op.launch_backward(o, q, k, v, o, lse, pre, params, policy, out=op.unpack(meta(b, n, 3, h, d, dtype=dtype)))


# ---------------------------------------------------------------------------------- contract tests
def _problem(dtype: str, qshape: tuple, prefix: bool, grad: bool, **options) -> Problem:
    opts = dict(is_causal=False, block_size=1, scale=None, deterministic=True)
    opts.update(options)
    return problem("attention", dtype, (qshape, qshape, qshape, (qshape[0],) if prefix else None), opts,
                   (grad, grad, grad, False), (None, None, None, "int32"))


def examples(dtype: str) -> list:
    """N = 37 and 19 (ragged tiles), D = 16 and 24 (a padded head dim), every mask kind, both determinisms."""
    return [
        _problem(dtype, (2, 2, 37, 16), True, True, is_causal=True, block_size=3),
        _problem(dtype, (1, 2, 19, 24), False, True, is_causal=True, deterministic=False),
        _problem(dtype, (2, 1, 19, 16), False, True, scale=0.3),
        _problem(dtype, (1, 1, 7, 16), True, False, is_causal=True, block_size=2),
    ]


def empty_batch(dtype: str) -> Problem:
    return _problem(dtype, (0, 2, 7, 16), True, True, is_causal=True, block_size=2)


def custom_ops() -> list:
    """opcheck samples of aimkern::attention_fwd / _bwd in both layouts, with a prefix."""
    out = []
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 3, 2, 16, generator=gen)
    prefix = torch.tensor([3, 0], dtype=torch.int32)
    params = op.AttentionParams(is_causal=True, block_size=2, scale=0.25)
    for layout in op.LAYOUTS:
        for path in ("fused", "split"):
            call = encode(op.AttentionCall(params=params, policy=LaunchPolicy(autotune=False, attention_backward=path),
                                           layout=layout))
            if layout == "packed":
                tensors = (qkv.clone().requires_grad_(), None, None)
            else:
                tensors = tuple(t.contiguous().requires_grad_() for t in op.unpack(qkv))
            out.append((f"attention_fwd {layout} {path}", torch.ops.aimkern.attention_fwd,
                        (*tensors, prefix, call)))
            with torch.no_grad():
                o, lse = torch.ops.aimkern.attention_fwd(*tensors, prefix, call)
            do = torch.randn(o.shape, generator=gen)
            out.append((f"attention_bwd {layout} {path}", torch.ops.aimkern.attention_bwd,
                        (do, *(None if t is None else t.detach() for t in tensors), o, lse, prefix, call)))
    return out


def _reference_fn(q, k, v, *, prefix_len=None, **options):
    return _reference(q, k, v, prefix_len=prefix_len, **options)


SPEC = add_spec(OpSpec(
    name="attention",
    tensor_args=TENSORS,
    grad_args=("q", "k", "v"),
    reference=_reference_fn,
    candidates=_candidates(),
    make_inputs=make_inputs,
    small_problem=small_problem,
    mask_kind=mask_kind,
    band=band,
    call_layout=_call_layout,
    tolerance=Tolerance(factor=2.0, atol={"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}),
    bench=BENCH,
    gate_problems=gate_problems,
    family="attention",
    custom_ops=custom_ops,
    examples=examples,
    empty_batch=empty_batch,
))
