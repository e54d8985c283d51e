"""The launch layer (aimkern/ops/_launch.py): a frozen LaunchPolicy decides autotuning and the attention
backward path when the forward runs, and the backward keeps that choice; observers see every launch."""
import importlib.util
import os

import pytest
import torch

import aimkern
from aimkern.ops import AttentionParams, LaunchPolicy, current_policy, launch_policy
from aimkern.ops._launch import observe
from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
SPLIT = {"attn_bwd_tiled_kernel"}
FUSED = {"attn_bwd_fused_kernel"}


def _qkv(n=40, d=16):
    return [torch.randn(1, 2, n, d, device=DEVICE).requires_grad_() for _ in range(3)]


def _kernels_of(fn) -> set:
    with observe() as launches:
        fn()
    return {launch.name for launch in launches}


def test_policy_is_checked_and_frozen():
    with pytest.raises(ValueError, match="attention_backward"):
        LaunchPolicy(attention_backward="fast")
    with pytest.raises(TypeError, match="autotune"):
        LaunchPolicy(autotune=1)
    with pytest.raises(Exception):
        LaunchPolicy().autotune = False  # frozen


def test_launch_policy_block_restores_the_previous_policy():
    before = current_policy()
    with launch_policy(attention_backward="split") as inner:
        assert current_policy() is inner and inner.attention_backward == "split"
        with launch_policy(autotune=False):
            assert current_policy() == LaunchPolicy(autotune=False, attention_backward="split")
    assert current_policy() == before


@pytest.mark.parametrize("forward_path,backward_context", [("split", "fused"), ("fused", "split")])
def test_backward_follows_the_policy_of_its_forward(forward_path, backward_context):
    """The path is decided at forward time: a different policy around the backward changes nothing."""
    q, k, v = _qkv()
    with launch_policy(attention_backward=forward_path):
        o = aimkern.attention(q, k, v, is_causal=True, backend="triton")
    with launch_policy(attention_backward=backward_context):
        names = _kernels_of(lambda: o.sum().backward())
    assert names == (SPLIT | {"attn_bwd_preprocess_kernel"} if forward_path == "split" else FUSED)


def test_auto_picks_the_fused_backward_for_short_sequences():
    q, k, v = _qkv()
    o = aimkern.attention(q, k, v, is_causal=True, backend="triton")
    assert _kernels_of(lambda: o.sum().backward()) == FUSED


def test_autotune_choice_travels_into_the_backward():
    q, k, v = _qkv()
    with launch_policy(autotune=False):
        o = aimkern.attention(q, k, v, backend="triton")
    with observe() as launches:
        o.sum().backward()
    assert launches and all(launch.policy.autotune is False for launch in launches)


def test_dry_run_observer_records_without_launching():
    from aimkern.kernels.launch_table import Choice, cfg
    from aimkern.ops._launch import launch

    class NeverLaunched:  # what launch() would index with a grid if it launched
        arg_names = ["x_ptr", "DOT_PRECISION"]

        def fn(self):
            pass

        def __getitem__(self, grid):
            raise AssertionError("the kernel was launched")

    choice = Choice(NeverLaunched(), (cfg(4, 1, BLOCK=16),), cfg(4, 1, BLOCK=16))
    with observe(dry_run=True) as launches:
        launch(choice, lambda meta: (1,), (torch.zeros(4),), dtype=torch.float32, policy=LaunchPolicy())
    assert [launch.name for launch in launches] == ["fn"]
    assert launches[0].constexprs["DOT_PRECISION"] == "tf32x3"  # one fp32 precision for every kernel
    with pytest.raises(AssertionError, match="launched"):  # without dry_run it does launch
        launch(choice, lambda meta: (1,), (torch.zeros(4),), dtype=torch.float32, policy=LaunchPolicy())


def _load_benchmark(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, os.path.dirname(path))  # its `common` helpers
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_benchmark_split_column_runs_the_split_kernels():
    """benchmarks/attn_throughput.py's "aimkern split bwd" column times the split backward, not the fused
    one (it once restored a global before autograd ran the backward, and timed the fused path): the column
    is the spec's triton-split candidate, and the benchmark's own check tells the two backwards apart."""
    from aimkern.specs import get_spec

    bench = _load_benchmark("attn_throughput")
    spec = get_spec("attention")
    assert bench.BENCH["attention"]["peers"]["aimkern split bwd"] == "triton-split"
    params = AttentionParams(is_causal=True)
    bench.check_split_column(spec.candidate("triton-split").fn, *_qkv(), None, params)
    with pytest.raises(AssertionError, match="not the split backward"):
        bench.check_split_column(spec.candidate("triton-fused").fn, *_qkv(), None, params)


def test_ops_namespace_is_reachable_from_a_fresh_import():
    """README: ``aimkern.attention_qkvpacked`` and ``aimkern.ops.launch_policy`` after ``import aimkern``."""
    import subprocess
    import sys

    code = "import aimkern; aimkern.ops.launch_policy; aimkern.attention_qkvpacked; aimkern.ops.LaunchPolicy()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
