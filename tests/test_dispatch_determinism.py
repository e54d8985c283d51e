"""Deterministic means the same sums everywhere: an autotuned kernel's config is decided once, with the
dispatch decision, forced for every later launch (aimkern/ops/_forced_configs.py), recorded with the decision
(the decisions file, a training run's recorded choices) and installed again on ``--resume``.

Under the interpreter nothing autotunes, so these tests force configs (a forced config replaces the
interpreter's) and, for the training run, stand a fake autotuner in for Triton's: it runs the table's last
config, as an autotuner on a GPU might, and says so through ``best_config`` as Triton's does."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from aimkern import dispatch
from aimkern.dispatch import core, measure
from aimkern.ops import AttentionParams
from aimkern.ops import _forced_configs as forced_configs
from aimkern.ops import _launch
from aimkern.ops._launch import pow2
from aimkern.train import checkpoint as ckpt
from aimkern.train import loop, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D = 64, 16  # fp32: the tiled backward's table has (16 x 64) and (32 x 32) tiles here, both padding nothing


@pytest.fixture(autouse=True)
def clean_table():
    forced_configs.clear()
    yield
    forced_configs.clear()


def _tiled_backward():
    from aimkern.kernels import attention as kern

    choice = kern.backward_tiled(D, True, N)
    assert len(choice.configs) == 2, "the test needs a Choice the autotuner picks from"
    return choice, (pow2(N), D, True, False, "float32")


def _gradient_digest() -> str:
    """sha256 of dq, dk, dv of one causal fp32 attention through the tiled backward (fixed inputs)."""
    from aimkern.ops.attention import attention_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, N, D, generator=g).requires_grad_() for _ in range(3)]
    o = attention_triton(q, k, v, None, AttentionParams(is_causal=True), backward="split")
    grads = torch.autograd.grad(o.square().sum(), [q, k, v])
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in grads)).hexdigest()


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_dispatch_determinism as t
from aimkern.ops import _forced_configs
choice, key = t._tiled_backward()
_forced_configs.force(choice.name, key, choice.configs[int(sys.argv[1])])
with _forced_configs.recording() as ran:
    digest = t._gradient_digest()
assert [p["config"] for p in ran] == [_forced_configs.config_record(choice.configs[int(sys.argv[1])])], ran
print(digest)
"""


def _in_child(index: int) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    code = _CHILD.format(tests=os.path.join(ROOT, "tests"))
    return subprocess.Popen([sys.executable, "-c", code, str(index)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_forced_config_gives_the_same_gradient_bits_in_two_processes():
    children = [_in_child(0), _in_child(0)]  # two processes, the same forced config
    outs = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-2000:]
        outs.append(out.strip().splitlines()[-1])
    assert outs[0] == outs[1]

    choice, key = _tiled_backward()
    digests = []
    for config in choice.configs:  # here: each config of the table, forced in turn
        forced_configs.force(choice.name, key, config)
        digests.append(_gradient_digest())
    assert digests[0] == outs[0]  # this process, forced alike, sums alike
    assert digests[0] != digests[1], "the two configs sum dQ in different orders: the bits differ"


def test_a_forced_config_the_choice_does_not_have_is_a_clear_error():
    choice, key = _tiled_backward()
    forced_configs.force(choice.name, key, {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 128}, "num_warps": 8,
                                            "num_stages": 3}, origin="this test")
    with pytest.raises(ValueError, match=r"attn_bwd_tiled_kernel: the config .*BLOCK_M.: 128.* forced for key "
                                         r".*by this test.* is not one of the configs this launch may run"):
        _gradient_digest()


def test_a_malformed_forced_config_is_refused_when_forced():
    with pytest.raises(ValueError, match="num_warps"):
        forced_configs.force("attn_bwd_tiled_kernel", [64], {"kwargs": {"BLOCK_M": 16}})
    with pytest.raises(TypeError, match="key must be a list"):
        forced_configs.force("attn_bwd_tiled_kernel", 64, {"kwargs": {}, "num_warps": 4, "num_stages": 1})


# ------------------------------------------------------------------------------------ training + --resume
# 24-pixel images: 36 patches, where the tiled backward's two fp32 tiles pad the keys alike (both kept)
TINY = ["--batch-size", "2", "--img-size", "24", "--log-every", "1", "--no-progress", "--save-every", "0",
        "--device", "cpu"]


class FakeAutotuner:
    """Triton's Autotuner as ``launch`` uses it, on the interpreter: runs the table's last config (what a
    GPU's timings might pick) and keeps it in ``best_config``; counts its launches."""

    launches: list = []

    def __init__(self, choice):
        self.choice = choice

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            c = self.best_config = self.choice.configs[-1]
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            FakeAutotuner.launches.append(self.choice.name)
            self.choice.kernel[grid(meta)](*args, **constexprs, **meta)

        return run


@pytest.fixture
def autotuned_triton_attention(monkeypatch, tmp_path):
    """Measured dispatch that picks aimkern's tiled attention (the fake timings below) and autotunes its
    several-config Choices with ``FakeAutotuner``."""
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_DISPATCH_INTERPRETER", "1")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_launch, "autotunes", lambda choice, policy: len(choice.configs) > 1)
    monkeypatch.setattr(_launch, "_autotuner", FakeAutotuner)
    FakeAutotuner.launches = []

    def timed(spec, cand, problem, **kw):  # the tiled attention is "fastest"; every other op's Triton path slowest
        if spec.name == "attention":
            return 0.001 if cand.name == "triton-split" else 1.0
        return 1000.0 if cand.kind == "aimkern" else 1.0

    monkeypatch.setattr(measure, "time_ms", timed)
    real_eligible = core._eligible

    def eligible(problem):  # of the interpreted paths only the tiled attention: the others would cost minutes
        why_not = real_eligible(problem)
        return lambda c: "left out by this test" if c.interpreted and c.name != "triton-split" else why_not(c)

    monkeypatch.setattr(core, "_eligible", eligible)
    dispatch.reset()
    yield
    monkeypatch.undo()
    dispatch.reset()


@pytest.mark.slow
def test_recorded_configs_are_installed_on_resume_before_the_first_step(autotuned_triton_attention, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "run"
    train([*TINY, "--steps", "2", "--stop-at", "1", "--out", str(out)])
    assert "attn_bwd_tiled_kernel" in FakeAutotuner.launches
    state, _ = ckpt.load_latest(str(out))
    recorded = state["dispatch"]
    attention = [v for k, v in recorded.items() if k.startswith("attention|")]
    assert attention and all(isinstance(v, dict) and v["chosen"] == "triton-split" for v in attention)
    picks = [p for v in attention for p in v["configs"]]
    assert {p["kernel"] for p in picks} == {"attn_bwd_tiled_kernel"}
    choice, _ = _tiled_backward()
    assert all(p["config"] == forced_configs.config_record(choice.configs[-1]) for p in picks)
    with open(out / "run.json") as f:
        assert json.load(f)["dispatch"] == recorded
    with open(tmp_path / "cache" / "dispatch.json") as f:  # the decisions file holds them too
        cached = [e for k, e in json.load(f)["entries"].items() if k.startswith("attention|")]
    assert cached and all(e["configs"] for e in cached if e["chosen"] == "triton-split")

    dispatch.reset()  # a new process: nothing decided or forced, an empty cache folder
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "other-cache"))
    FakeAutotuner.launches = []
    at_first_step = []
    real_step = loop.train_step

    def step(*args, **kwargs):
        if not at_first_step:
            at_first_step.append(forced_configs.forced())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    with forced_configs.recording() as ran:
        train([*TINY, "--steps", "2", "--out", str(out), "--resume"])
    assert sorted(map(json.dumps, at_first_step[0])) == sorted(map(json.dumps, picks))  # installed before step 1
    assert FakeAutotuner.launches == []  # nothing autotuned again: the recorded configs ran
    assert [p["config"] for p in ran if p["kernel"] == "attn_bwd_tiled_kernel"] == [picks[0]["config"]]
    assert {k: dispatch.chosen_name(v) for k, v in dispatch.choices().items()} == \
        {k: dispatch.chosen_name(v) for k, v in recorded.items()}
    assert dispatch.choices() == recorded  # and the resumed run records them again for the next resume


def test_old_recorded_choices_and_cache_entries_without_configs_still_load(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    try:
        dispatch.pin({"attention|float32|causal|grad|n64": "sdpa"})  # a checkpoint written before configs
        with pytest.raises(TypeError, match="recorded configs of"):
            dispatch.pin({"attention|float32|causal|grad|n64": {"chosen": "sdpa", "configs": [{"kernel": "k"}]}})
    finally:
        dispatch.reset()


def _attention_call():
    import aimkern

    q, k, v = [torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3)]
    aimkern.attention(q, k, v, is_causal=True).sum().backward()


def test_a_cached_decision_installs_its_configs_and_a_malformed_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    try:
        _attention_call()  # decided on the CPU: PyTorch's paths, nothing autotuned, no configs
        (row,) = dispatch.report()
        assert row["configs"] == [] and forced_configs.forced() == []
        path = tmp_path / "dispatch.json"
        data = json.loads(path.read_text())
        pick = {"kernel": "some_kernel", "key": [64, True, "float32"],
                "config": {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}}
        data["entries"][row["key"]]["configs"] = [pick]  # as a GPU's decision would have recorded it
        path.write_text(json.dumps(data))
        dispatch.reset()
        _attention_call()
        (row,) = dispatch.report()
        assert row["from_cache"] and row["configs"] == [pick] and forced_configs.forced() == [pick]
        assert dispatch.choices()[row["problem_key"]]["configs"] == [pick]

        data["entries"][row["key"]]["configs"] = [{"kernel": "some_kernel"}]  # malformed: measured again
        path.write_text(json.dumps(data))
        dispatch.reset()
        _attention_call()
        (row,) = dispatch.report()
        assert not row["from_cache"] and forced_configs.forced() == []
    finally:
        dispatch.reset()
