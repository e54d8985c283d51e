"""Verification runs what the real call runs (issue 28, item 2): for every spec's Triton candidate at the
benchmark shapes (benchmarks/bench_cases.py; the packed ops at benchmarks/native_throughput.py's steps),
the kernels, table configs and specializations that its verification problem launches are those the real
call launches (``aimkern.dispatch.coverage``).

Under Triton's interpreter with the GPU tables (``gpu_configs``: the configs, CE chunks and tiles the GPU
runs), with nothing launched (``observe(dry_run=True)``), so the benchmark shapes cost only their
allocations. fp16 stands for both 16-bit dtypes (the tables key on fp32 or not; the interpreter refuses bf16).
Attention's real call runs on fewer images than the benchmark's (only the FLAT grid depends on B * H, above
65,535 heads, and it is held equal), while its verification problem is built from the benchmark's own shape.
"""
import math
import os
import sys

import pytest
import torch

from aimkern.data.decode import pixel_affine
from aimkern.dispatch.coverage import launched
from aimkern.ops._launch import gpu_configs
from aimkern.ops.attention import AttentionParams, flat_launch, fused_backward_fits
from aimkern.ops.attention_varlen import VarlenAttentionParams
from aimkern.ops.cross_entropy import CrossEntropyParams
from aimkern.ops.patch_embed import PatchEmbedParams
from aimkern.ops.pixel_loss import PixelLossParams
from aimkern.ops.pixel_loss_varlen import PixelLossVarlenParams
from aimkern.specs import Problem, get_spec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from bench_cases import BENCH  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's dry run (tests/conftest.py "
                                "turns it on where there is no GPU)")


def _attention_cases():
    bench = BENCH["attention"]
    for shape in bench["shapes"]:
        b, n, d, h = shape["B"], shape["N"], shape["D"], bench["heads"]
        for mask in bench["masks"]:
            causal = mask != "full"
            block = max(1, math.isqrt(n)) if mask == "block" else 1
            yield (f"attention B={b} N={n} D={d} {mask}",
                   Problem("attention", "cpu", "float16", ((b, h, n, d),) * 3 + (((b,) if mask == "prefix" else None),),
                           AttentionParams(is_causal=causal, block_size=block), (True, True, True, False),
                           ("float16",) * 3 + (("int32",) if mask == "prefix" else (None,))))


def _cross_entropy_cases():
    for shape in BENCH["linear_cross_entropy"]["quick"]:
        t, e, v = shape["T"], shape["E"], shape["V"]
        for grad in (True, False):
            yield (f"linear_cross_entropy T={t} E={e} V={v} grad={grad}",
                   Problem("linear_cross_entropy", "cpu", "float16", ((t, e), (v, e), (t,), None),
                           CrossEntropyParams(), (grad, grad, False, False), ("float16", "float16", "int64", None)))


def _patch_embed_cases():
    for shape in BENCH["patch_embed"]["shapes"]:
        b, img, p, e = shape["batch"], shape["img"], shape["patch"], shape["dim"]
        n = (img // p) ** 2
        yield (f"patch_embed B={b} {img}px p{p} E={e}",
               Problem("patch_embed", "cpu", "float16", ((b, 3, img, img), (e, 3, p, p), (e,), (n, e)),
                       PatchEmbedParams(), (False, True, True, True), ("float16",) * 4))
        # uint8 images normalized in the kernels (the packed model's call): the verification takes them too
        yield (f"patch_embed B={b} {img}px p{p} E={e} uint8",
               Problem("patch_embed", "cpu", "float16", ((b, 3, img, img), (e, 3, p, p), (e,), (n, e)),
                       PatchEmbedParams(*pixel_affine(3)), (False, True, True, True), ("uint8",) + ("float16",) * 3))


def _pixel_loss_cases():
    for shape in BENCH["next_patch_pixel_loss"]["shapes"]:
        b, img, p = shape["batch"], shape["img"], shape["patch"]
        n = (img // p) ** 2
        yield (f"next_patch_pixel_loss B={b} {img}px p{p}",
               Problem("next_patch_pixel_loss", "cpu", "float16", ((b, n, 3 * p * p), (b, 3, img, img), (b,)),
                       PixelLossParams(patch_size=p), (True, False, False), ("float16", "float16", "int32")))


def _varlen_cases():
    """The packed ops at benchmarks/native_throughput.py's steps: 8 x N tokens of images of at most N patches
    (N = 256, 576, 1,024), about 8 x N / (N / 2) images and the padding sequences, 12 heads of 64."""
    for budget in (256, 576, 1024):
        t, s = 8 * budget, 20
        for mask in ("causal", "prefix", "block"):
            per_seq = ((s,), None) if mask == "block" else (None, (s,) if mask == "prefix" else None)
            yield (f"attention_varlen T={t} S={s} {mask}",
                   Problem("attention_varlen", "cpu", "float16", ((t, 12, 64),) * 3 + ((s + 1,),) + per_seq,
                           VarlenAttentionParams(max_seqlen=budget, is_causal=True), (True, True, True, False,
                                                                                     False, False),
                           ("float16",) * 3 + ("int32", "int32" if per_seq[0] else None,
                                               "int32" if per_seq[1] else None)))
        yield (f"next_patch_pixel_loss_varlen T={t} S={s}",
               Problem("next_patch_pixel_loss_varlen", "cpu", "float16", ((t, 768), (t, 768), (s + 1,), (s,)),
                       PixelLossVarlenParams(), (True, False, False, False), ("float16", "uint8", "int32", "int32")))


CASES = [*_attention_cases(), *_cross_entropy_cases(), *_patch_embed_cases(), *_pixel_loss_cases(), *_varlen_cases()]


def _fewer_images(problem: Problem) -> Problem:
    """Attention's real call on at most 4 images: the same launches (only FLAT depends on B * H)."""
    if problem.op != "attention":
        return problem
    b, h, n, d = problem.shapes[0]
    b2 = min(b, 4)
    assert flat_launch(b * h) == flat_launch(b2 * h)
    q = (b2, h, n, d)
    return problem.with_(shapes=(q, q, q, None if problem.shapes[3] is None else (b2,)))


def _triton_candidates(spec, problem):
    for c in spec.candidates:
        if c.kind != "aimkern":
            continue
        if c.name == "triton-fused":  # where an H100 holds a head's K, V on chip
            _, _, n, d = problem.shapes[0]
            if not fused_backward_fits(d, torch.float16, n, torch.device("meta")):
                continue
        if c.name == "triton-split-atomic" and problem.params.deterministic:
            continue
        yield c


@pytest.mark.parametrize("label,problem", CASES, ids=[c[0] for c in CASES])
def test_verification_launches_what_the_real_call_launches(label, problem):
    spec = get_spec(problem.op)
    with gpu_configs(0):
        small = spec.small_problem(problem)
        cands = list(_triton_candidates(spec, problem))
        assert cands
        for cand in cands:
            real = launched(spec, cand, _fewer_images(problem))
            verified = launched(spec, cand, small)
            assert real, (label, cand.name)
            assert verified == real, (label, cand.name, small.shapes, sorted(set(real) ^ set(verified)))
