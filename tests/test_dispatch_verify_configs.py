"""Verification runs what the real call may run: every config an autotuned kernel may pick, and the
launch geometry of the real shape (attention's flat grid above 65,535 heads), not only what the small
verification problem would pick for itself (aimkern/dispatch/measure.py ``verify``).

A candidate here launches a tiny two-config kernel through the launch layer: config 0 is right, config 1
scales the output by 1.5. On a GPU the autotuner may pick either at the real shape, from noisy timings, so
verification must run both. Under the interpreter nothing autotunes; ``gpu_configs(0)`` stands for the GPU
(the launch runs config 0, and the others are what the GPU's autotuner could pick).
"""
import pytest
import torch
import triton
import triton.language as tl

from aimkern.dispatch import measure
from aimkern.kernels.launch_table import Choice, cfg
from aimkern.ops import _forced_configs
from aimkern.ops._launch import LaunchPolicy, gpu_configs, launch, observe
from aimkern.ops.attention import FLAT_ABOVE, AttentionParams, flat_launch
from aimkern.reference.attention import attention_reference
from aimkern.specs import Candidate, Problem, get_spec

N, D = 40, 16


@triton.jit
def _scaled_copy_kernel(X, OUT, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(OUT + offs, tl.load(X + offs, mask=ok) * FACTOR, mask=ok)


def _choice(wrong: bool) -> Choice:
    second = 1.5 if wrong else 1.0
    return Choice(kernel=_scaled_copy_kernel,
                  configs=(cfg(1, 1, BLOCK=16, FACTOR=1.0), cfg(1, 1, BLOCK=32, FACTOR=second)),
                  interpreter=cfg(1, 1, BLOCK=16, FACTOR=1.0), key=("n",))


def _candidate(wrong: bool) -> Candidate:
    choice = _choice(wrong)

    def fn(q, k, v, prefix_len, params):
        out = attention_reference(q, k, v, is_causal=params.is_causal, prefix_len=prefix_len)
        one = torch.ones(4, dtype=torch.float32)
        factor = torch.empty_like(one)
        launch(choice, lambda meta: (triton.cdiv(4, meta["BLOCK"]),), (one, factor, 4), dtype=torch.float32,
               policy=LaunchPolicy(autotune=True))
        return out * factor[0]  # the kernel's factor scales the output and, through it, every gradient

    return Candidate("two-config", fn, kind="aimkern")


def _problem(b: int = 1, h: int = 2) -> Problem:
    shape = (b, h, N, D)
    return Problem("attention", "cpu", "float32", (shape, shape, shape, None), AttentionParams(is_causal=True),
                   (True, True, True, False), ("float32",) * 3 + (None,))


@pytest.fixture(autouse=True)
def clean_table():
    _forced_configs.clear()
    yield
    _forced_configs.clear()


def test_a_config_only_the_autotuner_may_pick_is_verified():
    spec = get_spec("attention")
    with gpu_configs(0):
        why = measure.verify(spec, _candidate(wrong=True), _problem())
    assert why is not None
    assert "_scaled_copy_kernel at BLOCK=32,FACTOR=1.5" in why, why
    assert "output 0" in why, why


def test_every_config_runs_and_right_ones_pass():
    spec = get_spec("attention")
    with gpu_configs(0), _forced_configs.recording() as ran:
        why = measure.verify(spec, _candidate(wrong=False), _problem())
    assert why is None
    blocks = sorted(p["config"]["kwargs"]["BLOCK"] for p in ran if p["kernel"] == "_scaled_copy_kernel")
    assert blocks == [32]  # config 0 ran as the fixed config; config 1 was forced (and recorded) after it


def test_the_interpreter_own_config_is_all_that_runs_there():
    """Without gpu_configs the interpreter runs its own config, in verification as in the real call."""
    spec = get_spec("attention")
    assert measure.verify(spec, _candidate(wrong=True), _problem()) is None


def test_forcing_restores_the_table():
    _forced_configs.force("k", [1, "float32"], cfg(1, 1, BLOCK=16))
    before = _forced_configs.forced()
    with _forced_configs.forcing([{"kernel": "k", "key": [1, "float32"], "config": cfg(2, 1, BLOCK=32)},
                                  {"kernel": "j", "key": [2, "float32"], "config": cfg(1, 1, BLOCK=8)}],
                                 origin="test"):
        assert len(_forced_configs.forced()) == 2
        assert _forced_configs.forced()[0]["config"]["kwargs"] == {"BLOCK": 32}
    assert _forced_configs.forced() == before


def test_pickable_lists_every_config_of_an_autotuned_launch():
    choice = _choice(wrong=False)
    x = torch.ones(4)
    with gpu_configs(0), _forced_configs.pickable() as seen:
        launch(choice, lambda meta: (1,), (x, torch.empty_like(x), 4), dtype=torch.float32,
               policy=LaunchPolicy(autotune=True))
        launch(choice, lambda meta: (1,), (x, torch.empty_like(x), 4), dtype=torch.float32,
               policy=LaunchPolicy(autotune=False))  # autotune off: only config 0 can ever run
    assert list(seen) == [("_scaled_copy_kernel", (4, "float32"))]
    assert [c["kwargs"]["BLOCK"] for c in seen[("_scaled_copy_kernel", (4, "float32"))]] == [16, 32]


@pytest.mark.parametrize("heads", [FLAT_ABOVE + 1, 4])
def test_verification_takes_the_real_calls_grid(heads):
    """A real call above FLAT_ABOVE heads runs the tiled kernels' flat grid; its verification problem (a few
    heads) must run that code too."""
    spec = get_spec("attention")
    problem = _problem(b=heads // 2 if heads > 4 else 1, h=2 if heads > 4 else heads)
    b, h = problem.shapes[0][:2]
    cand = spec.candidate("triton-split")
    with observe() as seen:
        assert measure.verify(spec, cand, problem) is None
    flats = {launch.constexprs.get("FLAT") for launch in seen if "FLAT" in launch.constexprs}
    assert flats == {flat_launch(b * h)}
    assert not flat_launch(4)  # nothing stays forced after the verification
