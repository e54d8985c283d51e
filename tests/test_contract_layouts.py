"""Contract: every op, every candidate that runs on CPU, fp32 and fp16, under the interpreter's tiles and the
GPU tables' (``contract_check.tables``), is right whatever the memory layout of its tensor arguments.

For each layout of ``contract_inputs.LAYOUTS`` (strided: a column of a wider tensor; offset: a slice past
element 0; transposed: memory order reversed; expanded: stride 0), every tensor argument of the op, integer
ones included (``target``, ``prefix_len``), and the incoming gradient are handed over in that layout at once;
outputs and every input gradient are held to the float64 reference (tests/contract_check.py). On a failure
the test tries each argument alone in that layout and names the ones that break it.

The inputs are ``contract_inputs.small_cases``: plain random values, small ragged shapes, every optional
tensor present (hostile values: test_contract_values.py; boundary sizes: test_contract_sizes.py).
"""
from __future__ import annotations

import pytest

from aimkern.specs import all_specs
from contract_check import check_case, for_candidate, params
from contract_inputs import LAYOUTS, NOT_LAID_OUT, applies, layouts_of, small_cases

SPECS = all_specs()


def _culprits(spec, cand, problem, tensors, layout, config) -> list:
    """The tensor arguments (and "incoming gradient") that fail alone in ``layout``."""
    n = len(tensors)
    names = list(spec.tensor_args) + ["incoming gradient"]
    out = []
    for i in range(n + 1):
        if i < n and (not applies(layout, tensors[i]) or (layout, names[i]) in NOT_LAID_OUT):
            continue
        one = tuple(layout if j == i else None for j in range(n + 1))
        msg = check_case(spec, cand, problem, tensors, layout=one, config=config)
        if msg is not None:
            out.append(f"{names[i]} alone: {msg}")
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec,cand,config", params(SPECS))
def test_every_argument_in_every_layout(spec, cand, config, dtype, layout):
    ran = 0
    for label, problem, tensors in small_cases(spec.name, dtype):
        problem = for_candidate(cand, problem, config)
        if problem is None:
            continue
        assert any(applies(layout, t) for t in tensors), f"{layout} changes no argument of {label}"
        ran += 1
        msg = check_case(spec, cand, problem, tensors, layout=layouts_of(spec.tensor_args, layout), config=config)
        if msg is not None:
            culprits = _culprits(spec, cand, problem, tensors, layout, config)
            pytest.fail(f"{spec.name} {label}, every argument {layout}: {msg}\n  "
                        + ("\n  ".join(culprits) or "no argument fails alone"))
    if not ran:
        pytest.skip(f"{cand.name} supports none of the small cases")
