"""Contract: sizes that cross every boundary of the kernels' launch tables, held to the float64 reference
(tests/contract_check.py) under the interpreter's tiles and the GPU tables'. Every size is derived from the
tables (kernels/*.py), not written down:

* attention (D = 64): the interpreter's tile change, the key-tail kernel's limit (KEY_TAIL_MAX), the fused
  backward's on-chip limit on the GPU tables, the short / long band edge; in the long band (BLOCK_N = 128,
  fp16, logits shifted so that lse is far below zero) the N whose key-tail kernel owns keys inside the
  tiled kernel's last tile, and the N whose last key tile holds BLOCK_N - 1 keys (slow); and the second
  entry of each table (what the autotuner may pick);
* linear_cross_entropy: two backward chunks under the GPU chunking rule (its byte budget lowered so a
  chunk is CUDA_BLOCK_T tokens), every config the autotuner gets above AUTOTUNE_MIN_MACS, and (slow) a run
  at that threshold, fp16 "mean" under a GradScaler's 32768 with a head at timm's init;
* patch_embed: the batch at which the big GEMM tables take over (on meta tensors), and every config of them;
* next_patch_pixel_loss: N one patch past a row block.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import pytest
import torch

from aimkern.kernels.launch_table import AUTOTUNE_MIN_MACS
from aimkern.ops import launch_policy
from aimkern.ops._launch import gpu_configs, interpreting, kernels, observe
from aimkern.specs import get_spec
from contract_check import CONFIGS, Upstream, check_case, for_candidate, runnable
from contract_inputs import (
    _randn, _shifted_qk, attention_problem, ce_inputs, ce_problem, patch_inputs, patch_problem, pixel_problem,
)

# CPU tensors through the Triton paths: under Triton's interpreter only (a CUDA machine runs the GPU tables
# natively: tests/test_gpu_*.py).
pytestmark = pytest.mark.skipif(not interpreting(), reason="runs Triton's interpreter on CPU tensors")

D = 64
ATT = get_spec("attention")
CE = get_spec("linear_cross_entropy")
PE = get_spec("patch_embed")
PX = get_spec("next_patch_pixel_loss")


def _triton(spec):
    return [c for c in spec.candidates if c.kind == "aimkern"]


@contextlib.contextmanager
def table_entry(index: int, tables=None):
    """Launches inside run entry ``index`` of each Choice's configs (of ``tables[kernel]`` where given: the
    configs a size above the autotune threshold would get), under the interpreter's other rules."""
    def pick(choice, policy):
        configs = (tables or {}).get(choice.kernel, choice.configs)
        return configs[min(index, len(configs) - 1)]

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("aimkern.ops.") and hasattr(m, "fixed_config")]
    saved = [(m, m.fixed_config) for m in modules]
    try:
        for m in modules:
            m.fixed_config = pick
        with launch_policy(autotune=False):
            yield
    finally:
        for m, f in saved:
            m.fixed_config = f


# ------------------------------------------------------------------------------------------- attention
def attention_edges(fp32: bool, config: str) -> list:
    """(N, why) pairs: the last N before and the first N past each boundary that ``config``'s tiles have (a
    boundary of the GPU tables counts where the entries on its two sides differ)."""
    kern = kernels("attention")
    # (from N past the first whole key tile: below it there is no key tail at all)
    rules = {"key-tail limit": lambda n: n <= kern.KEY_TAIL_QUANTUM or kern.key_tail(n, D)[1] != 0}
    if config == "interp":
        rules["interpreter tile"] = lambda n: kern.backward_tiled(D, fp32, n).interpreter.kwargs["BLOCK_N"]
    else:
        rules["query tail"] = lambda n: kern.query_tail_start(n) < n
        rules["fused fits"] = lambda n: kern.fused_backward_fits(D, fp32, n, 90)
        rules["band"] = lambda n: tuple(kern.table_entries(kind, D, fp32, kern.band(n)) for kind in ("fwd", "bwd"))
    sizes: dict = {}
    for why, rule in rules.items():
        edge = next((n for n in range(16, 1024) if rule(n) != rule(n + 1)), None)
        for n in () if edge is None else (edge, edge + 1):
            sizes[n] = "+".join(filter(None, (sizes.get(n), why.replace(" ", "-"))))
    return sorted(sizes.items())


def long_band_ragged() -> list:
    """Long band (GPU tables, BLOCK_N = 128): the first N whose key-tail kernel owns keys inside the tiled
    kernel's last tile (K_END not a multiple of BLOCK_N), and the first whose last tile holds BLOCK_N - 1.
    The tables now hand the tiled kernel the configs that pad K_END least, so the first kind may not exist
    (at N = 577 the key tile is 64, which divides K_END = 576): then only the second is returned."""
    kern = kernels("attention")
    first = next(n for n in range(257, 2048) if not kern.band(n) == "short")

    def bn(n):
        return kern.backward_tiled(D, False, n).configs[0].kwargs["BLOCK_N"]

    owned = next((n for n in range(first, 2048) if kern.key_tail(n, D)[1] and kern.key_tail(n, D)[0] % bn(n)),
                 None)
    short = next(n for n in range(first, 2048) if kern.key_tail(n, D)[1] == 0 and n % bn(n) == bn(n) - 1)
    return [n for n in (owned, short) if n is not None]


def _attention_case(dtype: str, n: int, lse_negative: bool = False):
    """Random values: full attention at the lower size of an edge (even N), prefix-causal at the upper one.
    ``lse_negative``: full attention on logits shifted far below zero (contract_inputs.attention_cases), where
    a padded key row that is not masked out gets p = exp(-lse) = inf."""
    gen = torch.Generator().manual_seed(n)
    shape = (1, 1, n, D)
    dt = getattr(torch, dtype)
    if lse_negative:
        q, k = _shifted_qk(shape, gen, dt, -1.0)
        return attention_problem(dtype, shape, prefix=False), (q, k, _randn(shape, gen, dt), None)
    causal = n % 2 == 1
    problem = attention_problem(dtype, shape, prefix=causal, is_causal=causal)
    return problem, (*(_randn(shape, gen, dt) for _ in range(3)),
                     torch.tensor([n // 3], dtype=torch.int32) if causal else None)


def _attention_params(slow: bool) -> list:
    """The interpreter's tiles do not depend on the dtype (fp16 only there); the GPU tables do (both); the
    long band's 128-key tiles are the 16-bit tables' (fp16 only)."""
    out = []
    for dtype, config in (("float16", "interp"), ("float32", "gpu"), ("float16", "gpu")):
        if not slow:
            sizes = attention_edges(dtype == "float32", config)
        elif dtype == "float16" and config == "gpu":
            sizes = [(n, "long-band-ragged-lse-negative") for n in long_band_ragged()]
        else:
            sizes = []
        for n, why in sizes:
            for cand in _triton(ATT):
                out.append(pytest.param(cand, config, dtype, n, id=f"{cand.name}-{config}-{dtype}-N{n}-{why}"))
    return out


def _check_attention(cand, config, dtype, n, lse_negative=False):
    problem, tensors = _attention_case(dtype, n, lse_negative)
    problem = for_candidate(cand, problem, config)
    if problem is None:
        pytest.skip(f"{cand.name} does not apply at N={n} ({config} tables)")
    msg = check_case(ATT, cand, problem, tensors, config=config)
    assert msg is None, f"attention N={n}: {msg}"


@pytest.mark.parametrize("cand,config,dtype,n", _attention_params(slow=False))
def test_attention_table_edges(cand, config, dtype, n):
    _check_attention(cand, config, dtype, n)


@pytest.mark.slow
@pytest.mark.parametrize("cand,config,dtype,n", _attention_params(slow=True))
def test_attention_long_band_ragged_tiles(cand, config, dtype, n):
    _check_attention(cand, config, dtype, n, lse_negative=True)


@pytest.mark.parametrize("n", [196, 257], ids=["short-band", "long-band"])
def test_attention_every_table_entry(n):
    """The entries past the first of the fp16 forward and backward tables (the first runs under "gpu")."""
    kern = kernels("attention")
    entries = max(len(kern.table_entries(kind, D, False, kern.band(n))) for kind in ("fwd", "bwd"))
    if entries == 1:  # the short band's forward lost its 128-row entry (cost budgets): the "gpu" cases run it
        pytest.skip(f"the N={n} tables have one entry, which the 'gpu' cases run: nothing else to pick")
    problem, tensors = _attention_case("float16", n)
    for index in range(1, entries):
        with table_entry(index):
            msg = check_case(ATT, ATT.candidate("triton-split"), problem, tensors, run=contextlib.nullcontext)
        assert msg is None, f"attention N={n}, table entry {index}: {msg}"


# ---------------------------------------------------------------------------------------- cross-entropy
CE_V, CE_E = 300, 48


@pytest.fixture
def cuda_block_chunks(monkeypatch):
    """The GPU chunking rule with a byte budget of one CUDA_BLOCK_T-token chunk, so that small problems
    run several chunks of the GPU's size (accumulating dW and d(bias) in fp32 across them)."""
    kern = kernels("cross_entropy")

    def lower(v, elem_bytes, tokens=kern.CUDA_BLOCK_T):
        monkeypatch.setattr(kern, "BWD_CHUNK_BYTES", tokens * v * elem_bytes)
        return tokens

    return lower


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cross_entropy_several_gpu_chunks(cuda_block_chunks, dtype, reduction):
    chunk = cuda_block_chunks(CE_V, torch.finfo(getattr(torch, dtype)).bits // 8)
    t = chunk + 37  # two chunks, the second ragged: dW and d(bias) accumulate
    problem = ce_problem(dtype, (t,), CE_V, CE_E, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    tensors = ce_inputs(problem, torch.Generator().manual_seed(t))
    msg = check_case(CE, CE.candidate("triton"), problem, tensors, config="gpu")
    assert msg is None, f"cross-entropy T={t} ({dtype}, {reduction}, chunks of {chunk}): {msg}"


def _ce_threshold_tokens(v: int, e: int) -> int:
    return -(-AUTOTUNE_MIN_MACS // (v * e))


def test_cross_entropy_autotune_threshold_on_meta():
    """At the threshold's token count the forward and matmul launches get the tuned tables; one token less,
    one config."""
    op = importlib.import_module("aimkern.ops.cross_entropy")
    v, e = 1024, 64
    t = _ce_threshold_tokens(v, e)
    counts = {}
    for tokens in (t - 1, t):
        x, w = (torch.empty(s, device="meta", dtype=torch.float16) for s in ((tokens, e), (v, e)))
        tgt = torch.empty(tokens, device="meta", dtype=torch.int64)
        with gpu_configs(), observe(dry_run=True) as launches:
            op.launch_forward_with_grad(x, w, None, tgt, op.CrossEntropyParams(), True, True, False,
                                        op.LaunchPolicy())
        counts[tokens] = {la.name: len(la.choice.configs) for la in launches}
    assert counts[t]["ce_fwd_kernel"] > 1 and counts[t]["matmul_kernel"] > 1, counts
    assert counts[t - 1]["ce_fwd_kernel"] == 1, counts


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_every_tuned_config(cuda_block_chunks, reduction):
    """Each config the autotuner gets above the threshold, on a two-chunk fp16 problem."""
    kern = kernels("cross_entropy")
    big = _ce_threshold_tokens(CE_V, CE_E)
    choices = (kern.tile("fwd", big, CE_V, CE_E, 2), kern.tile("dlogits", big, CE_V, CE_E, 2),
               kern.matmul(big, CE_V, CE_E, 2))
    tuned = {c.kernel: c.configs for c in choices}
    t = kern.bwd_chunk_tokens(10**6, CE_V, 2, True) + 5  # two chunks of the interpreter's rule
    problem = ce_problem("float16", (t,), CE_V, CE_E, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    tensors = ce_inputs(problem, torch.Generator().manual_seed(1))
    for index in range(max(len(c) for c in tuned.values())):
        with table_entry(index, tuned):
            msg = check_case(CE, CE.candidate("triton"), problem, tensors, run=contextlib.nullcontext)
        assert msg is None, f"cross-entropy, tuned config {index}: {msg}"


@pytest.mark.slow
def test_cross_entropy_at_the_autotune_threshold_under_a_gradscaler(cuda_block_chunks):
    """T x V x E = AUTOTUNE_MIN_MACS (T = 4096, V = 1024, E = 64), fp16, "mean", GradScaler's 32768 after one
    halving, a head at timm's init (std 0.02), bias, four chunks: torch's fp16 gradients keep the scale's
    precision; the Triton path must too."""
    v, e = 1024, 64
    t = _ce_threshold_tokens(v, e)
    cuda_block_chunks(v, 2, tokens=t // 4)
    problem = ce_problem("float16", (t,), v, e)
    tensors = ce_inputs(problem, torch.Generator().manual_seed(1), w_scale=0.02)
    msg = check_case(CE, CE.candidate("triton"), problem, tensors, upstream=Upstream(value=32768.0), config="gpu")
    assert msg is None, f"cross-entropy T={t} V={v} E={e} under a GradScaler: {msg}"


# ------------------------------------------------------------------------------------------ patch embed
def test_patch_embed_big_tables_take_over_on_meta():
    """The batch at which M x E x K reaches AUTOTUNE_MIN_MACS gets the big (tuned) 16-bit tables; one image
    less, the fixed small config."""
    op = importlib.import_module("aimkern.ops.patch_embed")
    c, img, p, e = 3, 32, 8, 64
    n, k = (img // p) ** 2, c * p * p
    b = -(-AUTOTUNE_MIN_MACS // (n * e * k))
    counts = {}
    for batch in (b - 1, b):
        images = torch.empty(batch, c, img, img, device="meta", dtype=torch.float16)
        weight = torch.empty(e, c, p, p, device="meta", dtype=torch.float16)
        with observe(dry_run=True) as launches:
            out = op.launch_forward(images, weight, None, None, op.LaunchPolicy())
            op.launch_backward_images(out, weight, images, op.LaunchPolicy())
        counts[batch] = {la.name: len(la.choice.configs) for la in launches}
    assert all(v > 1 for v in counts[b].values()) and all(v == 1 for v in counts[b - 1].values()), counts


def test_patch_embed_every_big_table_config():
    kern = kernels("patch_embed")
    big = {c.kernel: c.configs for c in (kern.forward(AUTOTUNE_MIN_MACS, True),
                                         kern.backward_images(AUTOTUNE_MIN_MACS, True))}
    problem = patch_problem("float16", 3, 3, 24, 40, 8, 40)  # M = 45 tokens, K = 192: ragged in every tile
    tensors = patch_inputs(problem, torch.Generator().manual_seed(4))
    for index in range(max(len(c) for c in big.values())):
        with table_entry(index, big):
            msg = check_case(PE, PE.candidate("triton"), problem, tensors, run=contextlib.nullcontext)
        assert msg is None, f"patch_embed, big-table config {index}: {msg}"


# ------------------------------------------------------------------------------------------- pixel loss
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_pixel_loss_rows_past_one_block(config, dtype):
    p, c = 4, 3
    choice = kernels("pixel_loss").loss(1024, p * p * c)  # a long row: the row block at its cap
    rows = (choice.interpreter if config == "interp" else choice.configs[0]).kwargs["BLOCK_R"]
    n = rows + 1
    problem = pixel_problem(dtype, 2, c, p, n * p, p)
    gen = torch.Generator().manual_seed(n)
    dt = getattr(torch, dtype)
    tensors = (_randn(problem.shapes[0], gen, dt), _randn(problem.shapes[1], gen, dt),
               torch.tensor([1, n - 2], dtype=torch.int32))
    (cand, _), = [rc for rc in runnable(PX) if rc[0].kind == "aimkern" and rc[1] == config]
    msg = check_case(PX, cand, problem, tensors, config=config)
    assert msg is None, f"pixel loss N={n} (row block {rows}): {msg}"
