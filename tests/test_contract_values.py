"""Contract: every op, every candidate that runs on CPU, fp32 and fp16, under the interpreter's tiles and the
GPU tables', is right on hostile values (``contract_inputs.hostile``), and its options refuse what the
reference refuses.

Hostile values, per op (held to the float64 reference, tests/contract_check.py):

* attention: logits shifted so that lse is far past exp's range in the dtype, negative and positive
  (q = 0.3 randn + c, k = 0.3 randn -/+ c), at the N whose last key tile holds 1 key and BLOCK_N - 1 keys
  (from the backward's tables); rows whose visible logits are all equal; v, and q, at half the fp16
  maximum; a large incoming gradient;
* linear_cross_entropy: logits around +-30 with label smoothing and z-loss (both autograd paths: "mean"
  and "none"); ignore_index on every token but one, and on every token ("mean": NaN, "sum": 0); a confident
  head (every target logit about 12 above the rest, under a GradScaler's 32768); a GradScaler's first
  scale, 65536; input at half the fp16 maximum;
* patch_embed: uint8 images (normalized in the kernels) at 0 everywhere, 255 everywhere and a 0 / 255
  checkerboard; images at half the fp16 maximum; bias and position embedding at a quarter of it each; a
  large incoming gradient;
* next_patch_pixel_loss: constant patches (variance 0) and near-constant ones, under norm_pix; pred at half
  the fp16 maximum; a GradScaler's 65536.

The cases about fp16's range (half its maximum, a GradScaler's scale) run in fp16 only.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import aimkern
from aimkern.ops._launch import interpreting
from aimkern.specs import Tolerance, all_specs
from contract_check import check_case, for_candidate, runnable, tables
from contract_inputs import hostile, hostile_names, small_cases

SPECS = all_specs()


def _hostile_params() -> list:
    out = []
    for spec in SPECS:
        for dtype in ("float32", "float16"):
            for name in hostile_names(spec.name, dtype):
                for cand, config in runnable(spec):
                    out.append(pytest.param(spec, cand, config, dtype, name,
                                            id=f"{spec.name}-{cand.name}-{config}-{dtype}-{name}"))
    return out


# Measured limits, held to a wider bound that still fails on anything worse (NaN, a wrong mask, a lost term):
# (op, dtype, case-name prefix) -> (tolerance, why).
KNOWN_LIMITS = {
    ("attention", "float32", "lse-very"): (
        Tolerance(factor=2.0, atol={"float32": 1e-4}),
        "fp32 dQ at |lse| ~ 99: the backward rebuilds p from the stored lse while delta = rowsum(o * do) comes "
        "from the forward's normalisation, so sum(dS) is off by ~1e-5 |delta|, times k's shared component "
        "(measured 1.6e-5 to 8.2e-5 against a bound of 1.3e-5; torch emulation of the same algorithm 2.7e-5)"),
    ("linear_cross_entropy", "float32", "confident-head"): (
        Tolerance(factor=3.5),
        "fp32 dx of a confident head (target logit ~12 above the rest): measured 3.97e-4 against eager fp32's "
        "1.3e-4; torch's own F.linear_cross_entropy errs 3.5e-4 on it"),
}


def _tolerance_for(spec, dtype: str, name: str):
    for (op, dt, prefix), (tol, _why) in KNOWN_LIMITS.items():
        if op == spec.name and dt == dtype and name.startswith(prefix):
            return dataclasses.replace(spec, tolerance=tol)
    return spec


@pytest.mark.parametrize("spec,cand,config,dtype,name", _hostile_params())
def test_hostile_values(spec, cand, config, dtype, name):
    (problem, tensors, upstream), = [(p, t, u) for n, p, t, u in hostile(spec.name, dtype, config) if n == name]
    applicable = for_candidate(cand, problem, config)
    if applicable is None:
        pytest.skip(f"{cand.name}: {cand.unsupported(problem) or 'does not fit the GPU tables'}")
    msg = check_case(_tolerance_for(spec, dtype, name), cand, applicable, tensors, upstream=upstream,
                     config=config)
    assert msg is None, f"{spec.name} {name}: {msg}"


# ------------------------------------------------------------------------------------------- options
def _options(problem) -> list:
    """(name, value) of each of the problem's params."""
    return [(f.name, getattr(problem.params, f.name)) for f in dataclasses.fields(problem.params)]


def _public(spec, tensors, params, backend):
    args, kwargs = spec.public_call(tensors, params)
    with torch.no_grad(), tables("interp"):
        return getattr(aimkern, spec.name)(*args, **kwargs, backend=backend)


def _outcome(spec, tensors, params, backend):
    try:
        return _public(spec, tensors, params, backend), None
    except (TypeError, ValueError) as e:
        return None, e


@pytest.mark.skipif(not interpreting(), reason="runs the Triton backend on CPU tensors (Triton's interpreter)")
@pytest.mark.parametrize("spec", [s for s in SPECS if any(
    isinstance(v, int) and not isinstance(v, bool) for _, v in _options(small_cases(s.name, "float32")[0][1]))],
    ids=lambda s: s.name)
def test_integer_options_refuse_what_the_reference_refuses(spec):
    """Each integer option given as a float (whole, fractional, NaN): where the reference backend raises a
    TypeError or ValueError the Triton backend raises one too; where it accepts, both agree."""
    _, problem, tensors = small_cases(spec.name, "float32")[0]
    wrong = []
    for name, value in _options(problem):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        for bad in (float(value), value + 0.5, math.nan):
            params = dataclasses.replace(problem.params, **{name: bad})
            ref, ref_err = _outcome(spec, tensors, params, "reference")
            got, got_err = _outcome(spec, tensors, params, "triton")
            if ref_err is not None and got_err is None:
                wrong.append(f"{name}={bad!r}: the reference raises {type(ref_err).__name__} ({ref_err}); "
                             f"triton returns {got if got.dim() == 0 else tuple(got.shape)}")
            elif ref_err is None and got_err is not None:
                wrong.append(f"{name}={bad!r}: the reference accepts it; triton raises {got_err!r}")
            elif ref_err is None and not torch.allclose(got.double(), ref.double(), rtol=1e-4, atol=1e-4,
                                                        equal_nan=True):
                wrong.append(f"{name}={bad!r}: triton differs from the reference by "
                             f"{float((got.double() - ref.double()).abs().max()):.3g}")
    assert not wrong, "\n".join(wrong)
