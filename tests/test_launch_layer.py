"""The launch layer (aimkern/ops/_launch.py): a frozen LaunchPolicy decides autotuning and the attention
backward path when the forward runs, and the backward keeps that choice; observers see every launch."""
import contextlib
import importlib.util
import os
import types

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


# ------------------------------------------------------------------------------------------ device guard
class _RecordingKernel:
    """What launch() indexes with a grid: records the device guard that is open when it is called."""

    arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]

    def __init__(self, guards):
        self.guards, self.calls = guards, []

    def fn(self):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(list(self.guards))


def _recording_guard(monkeypatch):
    """Replace the launch layer's device guard by one that records the device while it is open."""
    from aimkern.ops import _launch

    entered, open_now = [], []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        open_now.append(device)
        try:
            yield
        finally:
            open_now.pop()

    monkeypatch.setattr(_launch, "device_guard", guard)
    return entered, open_now


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_launch_runs_inside_the_guard_of_its_tensors_device(monkeypatch, device):
    from aimkern.kernels.launch_table import Choice, cfg
    from aimkern.ops._launch import launch

    entered, open_now = _recording_guard(monkeypatch)
    kernel = _RecordingKernel(open_now)
    choice = Choice(kernel, (cfg(4, 1, BLOCK=16),), cfg(4, 1, BLOCK=16))
    x, y = torch.zeros(4, device=device), torch.zeros(4, device=device)
    launch(choice, lambda meta: (1,), (x, y, 4), dtype=torch.float32, policy=LaunchPolicy(autotune=False))
    assert entered == [torch.device(device)] and kernel.calls == [[torch.device(device)]]


def test_the_guard_of_a_cuda_device_is_that_device_and_nothing_elsewhere():
    """torch.cuda.device(cuda:1) makes device 1 current for the launch (built, not entered: no GPU here)."""
    from aimkern.ops._launch import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for device in (torch.device("cpu"), torch.device("meta"), None):
        assert isinstance(device_guard(device), contextlib.nullcontext)


def test_every_launcher_of_every_op_goes_through_the_guard(monkeypatch):
    """Each op's forward and backward launches, run for real under the interpreter, enter the guard with
    their tensors' device, once per launch."""
    entered, _ = _recording_guard(monkeypatch)
    q, k, v = _qkv()
    x, w = torch.randn(5, 16, requires_grad=True), torch.randn(24, 16, requires_grad=True)
    images = torch.randn(2, 3, 8, 8)
    pw = torch.randn(16, 3, 4, 4, requires_grad=True)
    pred = torch.randn(2, 4, 48, requires_grad=True)
    calls = [
        lambda: aimkern.attention(q, k, v, is_causal=True, backend="triton").sum(),
        lambda: aimkern.linear_cross_entropy(x, w, torch.randint(0, 24, (5,)), backend="triton"),
        lambda: aimkern.patch_embed(images, pw, backend="triton").sum(),
        lambda: aimkern.next_patch_pixel_loss(pred, images, patch_size=4, backend="triton"),
    ]
    for call in calls:
        entered.clear()
        with observe() as launches:
            call().backward()
        assert len(launches) >= 2 and entered == [torch.device("cpu")] * len(launches)


def test_a_launch_refuses_tensors_on_two_devices_naming_the_arguments():
    from aimkern.kernels.launch_table import Choice, cfg
    from aimkern.ops._launch import launch

    kernel = _RecordingKernel([])
    choice = Choice(kernel, (cfg(4, 1, BLOCK=16),), cfg(4, 1, BLOCK=16))
    with pytest.raises(ValueError, match="y_ptr is on meta but x_ptr is on cpu"):
        launch(choice, lambda meta: (1,), (torch.zeros(4), torch.zeros(4, device="meta"), 4),
               dtype=torch.float32, policy=LaunchPolicy(autotune=False))
    assert kernel.calls == []  # nothing launched


@pytest.mark.parametrize("op", ["attention", "linear_cross_entropy", "patch_embed", "next_patch_pixel_loss"])
def test_every_op_refuses_inputs_on_two_devices_at_its_entry(op):
    meta = lambda t: t.to("meta")  # noqa: E731
    q = torch.randn(1, 2, 8, 16)
    calls = {
        "attention": (lambda: aimkern.attention(q, q, meta(q), backend="triton"), "v is on meta"),
        "linear_cross_entropy": (lambda: aimkern.linear_cross_entropy(
            torch.randn(4, 16), meta(torch.randn(8, 16)), torch.zeros(4, dtype=torch.long), backend="triton"),
            "linear_weight is on meta"),
        "patch_embed": (lambda: aimkern.patch_embed(torch.randn(1, 3, 8, 8), meta(torch.randn(4, 3, 4, 4)),
                                                    backend="triton"), "weight is on meta"),
        "next_patch_pixel_loss": (lambda: aimkern.next_patch_pixel_loss(
            torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8), patch_size=4, prefix_len=meta(torch.tensor([1])),
            backend="triton"), "prefix_len is on meta"),
    }
    call, message = calls[op]
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------- shared memory of the device
_PROFILES = {"sm_90": (90, 232448, 90), "sm_80": (80, 166912, 80), "sm_120": (120, 101376, 80)}


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make torch report one CUDA device of a given capability and opt-in shared memory per block."""
    from aimkern.ops import _launch

    def clear():
        for name in ("_cuda_facts", "_capability_of"):
            if hasattr(getattr(_launch, name, None), "cache_clear"):
                getattr(_launch, name).cache_clear()

    def install(capability: int, shared: int):
        props = types.SimpleNamespace(major=capability // 10, minor=capability % 10, multi_processor_count=84,
                                      shared_memory_per_block_optin=shared)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (props.major, props.minor))
        clear()
        return torch.device("cuda", 0)

    yield install
    clear()


@pytest.mark.parametrize("profile", sorted(_PROFILES))
def test_tables_are_chosen_by_the_devices_shared_memory(fake_cuda, profile):
    """Consumer Blackwell (sm_120) reports capability 12.0 but 99 KB per block: it gets the sm_80 tables,
    and the CE head's configs (128-192 KB on Hopper's tables) all fit it."""
    from aimkern.kernels import cross_entropy as ce
    from aimkern.ops._launch import fit_to_device, table_arch

    capability, shared, arch = _PROFILES[profile]
    device = fake_cuda(capability, shared)
    assert table_arch(device) == arch
    for kind in ("fwd", "dlogits"):
        choice = fit_to_device(ce.tile(kind, 65536, 8192, 768, 2, table_arch(device)), device, {}, torch.bfloat16)
        assert choice.configs and all(choice.shared(c, {}, 2) <= shared for c in choice.configs)
    matmul = fit_to_device(ce.matmul(65536, 768, 8192, 2, table_arch(device)), device, {}, torch.bfloat16)
    assert all(matmul.shared(c, {}, 2) <= shared for c in matmul.configs)


def test_fit_to_device_keeps_the_configs_that_fit_or_else_the_smallest():
    from aimkern.kernels.launch_table import Choice, cfg
    from aimkern.ops._launch import fit_to_device, meta_device

    big, small = cfg(8, 4, BLOCK=200), cfg(4, 2, BLOCK=60)
    choice = Choice(_RecordingKernel([]), (big, small), small, shared=lambda c, k, e: c.kwargs["BLOCK"] * 1024)
    meta = torch.device("meta")
    with meta_device(120, 101376):
        assert fit_to_device(choice, meta, {}, torch.float16).configs == (small,)
    with meta_device(90, 232448):
        assert fit_to_device(choice, meta, {}, torch.float16) is choice
    with meta_device(75, 50 * 1024):
        assert fit_to_device(choice, meta, {}, torch.float16).configs == (small,)  # none fits: the smallest
    assert fit_to_device(choice, torch.device("cpu"), {}, torch.float16) is choice  # the interpreter


@pytest.mark.parametrize("profile", sorted(_PROFILES))
def test_every_config_every_launcher_may_run_fits_the_device(profile, monkeypatch):
    """Every launch the compile gate's problems make (every op, dtype, head dim, band, mask, path) on a
    device of the profile: each config the launch may run (the autotuner's candidates included) fits its
    shared memory per block, and the first config, which launchers read before the launch to size their
    buffers (``fixed_config``), is never dropped."""
    import sys

    from aimkern.ops._launch import meta_device, observe

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from kernel_problems import FAMILIES
    finally:
        sys.path.pop(0)
    from aimkern.ops import _launch

    capability, shared, _ = _PROFILES[profile]
    read_first, fixed = [], _launch.fixed_config  # the Choices launchers read with fixed_config
    for name, module in list(sys.modules.items()):
        if name.startswith("aimkern.ops.") and module is not _launch and getattr(module, "fixed_config", None) is fixed:
            monkeypatch.setattr(module, "fixed_config", lambda choice, policy: read_first.append(choice) or
                                fixed(choice, policy))
    fitted, fit = [], _launch.fit_to_device  # (the launcher's Choice, what the launch may run) of each launch
    monkeypatch.setattr(_launch, "fit_to_device", lambda choice, *rest: fitted.append((choice, fit(choice, *rest)))
                        or fitted[-1][1])
    launches = []
    for problems in FAMILIES.values():
        with meta_device(capability, shared):
            for _label, run in list(problems("all")):
                with observe(dry_run=True) as seen:
                    run()
                launches += seen
    assert len(launches) > 500
    for launch in launches:
        elem = next(a for a in launch.args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point)
        for c in launch.choice.configs:
            need = launch.choice.shared(c, launch.constexprs, elem.element_size()) if launch.choice.shared else 0
            assert need <= shared, f"{launch.name} {c} needs {need} B > {shared} B ({profile})"
    read_first = {id(choice) for choice in read_first}
    checked = [(table, ran) for table, ran in fitted if id(table) in read_first]
    assert checked and all(ran.configs[0] is table.configs[0] for table, ran in checked)
