"""The compile gate: every kernel x every config its launcher can pick, compiled for real GPUs on a CPU.

    python benchmarks/kernel_report.py [--arch sm_90a sm_80] [--subset all|gpu-run] [--json FILE] [--jobs N]

Triton's interpreter never compiles a kernel, so it cannot see what only the compiler rejects (a plain
Python float used as a jit global) or what makes a kernel slow (spills, shared memory over the limit,
dots that fall back from wgmma to mma.sync). This script sees all of that without a GPU:

1. It drives the real launchers (aimkern/ops/*.py) on meta tensors over a grid of problems: every dtype
   (bf16, fp16, fp32), the head dims and sequence bands of the attention tables, every mask variant,
   both attention backward paths, bias / no bias, label smoothing, big (autotuned) and small (fixed)
   GEMMs. The launch layer's ``observe(dry_run=True)`` records each launch instead of running it: the
   exact arguments, strides and constexprs the launcher would pass.
2. Every config of every recorded Choice (the autotuner may pick any of them) is compiled for each arch
   with ``triton.compile`` and Triton's bundled ptxas, binding the arguments as the JIT does (so stride-1
   and 16-byte-alignment specializations match a real launch).
3. It reads registers, spills and shared memory from ``ptxas -v``, counts HGMMA (wgmma) / HMMA and
   cp.async (LDGSTS) / TMA loads in the SASS (``cuobjdump -sass``), and works out resident blocks per SM.

It prints a table, writes one JSON object per compile (``--json``), and exits 1 when any rule fails:
a compile error, shared memory over the arch's limit, a 16-bit config that spills, or an sm_90a 16-bit
main-loop kernel without wgmma. ``--subset gpu-run`` keeps the problems the GPU check runs
(benchmarks/gpu_check.sh: bf16 / fp16 at the benchmark shapes), for the gate on older Triton versions.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the CUDA launch paths, compiled: never the interpreter's configs

import torch  # noqa: E402

ARCHS = {"sm_90a": 90, "sm_80": 80}
# Max dynamic shared memory per block (opt-in) and per SM, bytes.
SMEM_PER_BLOCK = {90: 232448, 80: 166912}
SMEM_PER_SM = {90: 233472, 80: 167936}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
# Kernels whose main loop is a tensor-core GEMM: on sm_90a their 16-bit builds must use wgmma.
MAIN_LOOP_KERNELS = {
    "attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_fused_kernel",
    "ce_fwd_kernel", "ce_dlogits_kernel", "matmul_kernel",
    "patch_embed_fwd_kernel", "patch_embed_dx_kernel", "patch_embed_dw_kernel",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------ 1. the problems
def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def attention_problems(subset: str):
    """(label, thunk) pairs driving the attention launchers, packed (B, N, 3, H, D) qkv as a ViT block has."""
    op = importlib.import_module("aimkern.ops.attention")  # the module (aimkern.ops.attention is the function)

    # Every table entry is reached by bf16 with the most general mask (causal + prefix) at D = 64, 80, 128,
    # 256 and N in both bands; the other mask variants at D = 64, fp16 and fp32 at D = 64 and 128 (the
    # compile budget of CI: a full product would be ~5x the compiles for near-identical code).
    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    masks = {"full": (False, None), "causal": (True, None), "prefix": (True, "prefix")}
    qdev = torch.device("meta")
    for dname in dtypes:
        dtype = DTYPES[dname]
        dims = (64, 80, 128, 256) if dname == "bf16" and subset != "gpu-run" else (64, 128)
        for d in dims:
            for n in (196, 256, 1024):
                for mname, (causal, prefix) in masks.items():
                    if mname != "prefix" and (dname != "bf16" or d != 64):
                        continue
                    paths = ["split"]
                    if op._kernels().fused_backward_fits(d, dtype == torch.float32, n, op.table_arch(qdev)):
                        paths.append("fused")
                    for path in paths:
                        def run(dtype=dtype, d=d, n=n, causal=causal, prefix=prefix, path=path):
                            b, h = 2, 4
                            qkv = _meta(b, n, 3, h, d, dtype=dtype)
                            q, k, v = op._unpack(qkv)
                            pre = _meta(b, dtype=torch.int32) if prefix else None
                            policy = op.LaunchPolicy()
                            o, lse = op._launch_forward(q, k, v, pre, causal, 4 if causal else 1, d**-0.5, policy)
                            dqkv = _meta(b, n, 3, h, d, dtype=dtype)
                            op._launch_backward(o, q, k, v, o, lse, pre, causal, 4 if causal else 1, d**-0.5,
                                                policy, path, out=op._unpack(dqkv))

                        yield f"attention {dname} D={d} N={n} {mname} {path}", run
    # The fused backward at every on-chip head size it accepts (BLOCK_KV 16 ... 256), bf16 causal + prefix.
    if subset != "gpu-run":
        for n in (16, 32, 64, 128):
            def run_small(n=n):
                if not op._kernels().fused_backward_fits(64, False, n, op.table_arch(qdev)):
                    return
                qkv = _meta(2, n, 3, 4, 64, dtype=torch.bfloat16)
                q, k, v = op._unpack(qkv)
                pre = _meta(2, dtype=torch.int32)
                o, lse = op._launch_forward(q, k, v, pre, True, 1, 0.125, op.LaunchPolicy())
                op._launch_backward(o, q, k, v, o, lse, pre, True, 1, 0.125, op.LaunchPolicy(), "fused",
                                    out=op._unpack(_meta(2, n, 3, 4, 64, dtype=torch.bfloat16)))

            yield f"attention bf16 D=64 N={n} prefix fused", run_small


def patch_embed_problems(subset: str):
    op = importlib.import_module("aimkern.ops.patch_embed")  # the module (aimkern.ops.patch_embed is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    shapes = {"vit-b16 x256": (256, 224, 16, 768), "small": (2, 32, 4, 40)}
    for dname in dtypes:
        dtype = DTYPES[dname]
        for sname, (b, img, p, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, b=b, img=img, p=p, e=e, bias=bias):
                    images = _meta(b, 3, img, img, dtype=dtype)
                    weight = _meta(e, 3, p, p, dtype=dtype)
                    n = (img // p) ** 2
                    policy = op.LaunchPolicy()
                    out = op._launch_forward(images, weight, _meta(e, dtype=dtype) if bias else None,
                                             _meta(n, e, dtype=dtype), policy)
                    op._launch_backward_params(out, images, weight, True, True, policy)
                    op._launch_backward_params(out, images, weight, True, False, policy)
                    op._launch_backward_params(out, images, weight, False, True, policy)
                    op._launch_backward_images(out, weight, images, policy)

                yield f"patch_embed {dname} {sname} bias={bias}", run


def cross_entropy_problems(subset: str):
    op = importlib.import_module("aimkern.ops.cross_entropy")  # the module (aimkern.ops.cross_entropy is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    shapes = {"65536x768 V=8192": (65536, 8192, 768), "small": (300, 512, 80)}
    for dname in dtypes:
        dtype = DTYPES[dname]
        for sname, (t, v, e) in shapes.items():
            for bias in (True, False) if dname == "bf16" else (True,):
                for smoothing in (0.0, 0.1) if dname == "bf16" else (0.1,):
                    if subset == "gpu-run" and smoothing:
                        continue

                    def run(dtype=dtype, t=t, v=v, e=e, bias=bias, smoothing=smoothing):
                        x, w = _meta(t, e, dtype=dtype), _meta(v, e, dtype=dtype)
                        b = _meta(v, dtype=dtype) if bias else None
                        tgt = _meta(t, dtype=torch.int64)
                        params = op.CrossEntropyParams("mean", -100, smoothing, 1e-4)
                        policy = op.LaunchPolicy()
                        lse, _, _ = op._launch_forward(x, w, b, tgt, params, policy)
                        grad = _meta(1, dtype=torch.float32).expand(t)
                        op._launch_backward(grad, x, w, b, tgt, lse, params, True, True, bias, policy)

                    yield f"cross_entropy {dname} {sname} bias={bias} smoothing={smoothing}", run


def pixel_loss_problems(subset: str):
    op = importlib.import_module("aimkern.ops.pixel_loss")  # the module (aimkern.ops.pixel_loss is the function)

    dtypes = ("bf16", "fp16") if subset == "gpu-run" else ("bf16", "fp16", "fp32")
    for dname in dtypes:
        dtype = DTYPES[dname]
        for prefix in (True, False) if dname == "bf16" else (True,):
            for norm_pix in (True, False) if dname == "bf16" else (True,):
                def run(dtype=dtype, prefix=prefix, norm_pix=norm_pix):
                    pred, images = _meta(64, 196, 768, dtype=dtype), _meta(64, 3, 224, 224, dtype=dtype)
                    pre = _meta(64, dtype=torch.int32) if prefix else None
                    params = op.PixelLossParams(patch_size=16, norm_pix=norm_pix)
                    op._launch(pred, images, pre, None, params, backward=False)
                    op._launch(pred, images, pre, _meta(1, dtype=torch.float32), params, backward=True)

                yield f"pixel_loss {dname} prefix={prefix} norm_pix={norm_pix}", run


FAMILIES = {
    "attention": attention_problems,
    "patch_embed": patch_embed_problems,
    "cross_entropy": cross_entropy_problems,
    "pixel_loss": pixel_loss_problems,
}


# ------------------------------------------------------------------------------- 2. compile jobs
@dataclass
class Job:
    kernel_module: str
    kernel: str
    args: tuple  # ("ptr", dtype name, byte offset) for tensors, plain ints / floats otherwise
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: str
    dtype: str
    problems: list = field(default_factory=list)

    def key(self) -> tuple:
        """What decides the compiled code: argument specializations, not values (Triton's JIT compiles an
        int once per class: == 1, multiple of 16, other, 64-bit; a pointer per dtype and 16-byte alignment)."""
        return (self.kernel_module, self.kernel, tuple(_specialization(a) for a in self.args),
                tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages, self.arch)


def _specialization(a) -> tuple:
    if isinstance(a, tuple):
        return (a[1], a[2] % 16 == 0)
    if isinstance(a, float):
        return ("fp32",)
    return ("i64" if not -(2**31) <= a < 2**31 else "i32", a == 1, a % 16 == 0)


_TRITON_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                 torch.int32: "int32", torch.int64: "int64"}


def _describe_arg(a):
    if isinstance(a, torch.Tensor):
        # A real allocation is 256-byte aligned; a view adds its storage offset (e.g. k of a packed qkv).
        return ("ptr", _TRITON_DTYPE[a.dtype], a.storage_offset() * a.element_size())
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise TypeError(f"unexpected launch argument {a!r}")
    return a


def _input_dtype(launch) -> str:
    tensors = [a for a in launch.args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[tensors[0].dtype]


def collect_jobs(families, subset: str, archs, kernels=None) -> list:
    """Every (kernel, config, arch) the launchers can pick for the problems, deduplicated by specialization.
    The launchers run once per arch: their tables may differ (Hopper vs Ampere tiles)."""
    from aimkern.ops._launch import meta_arch, observe

    jobs: dict = {}
    for arch in archs:
        for family in families:
            with meta_arch(ARCHS[arch]):  # the problem lists ask which paths fit this arch too
                problems = list(FAMILIES[family](subset))
            for label, run in problems:
                with meta_arch(ARCHS[arch]), observe(dry_run=True) as launches:
                    run()
                for launch in launches:
                    fn = launch.choice.kernel.fn
                    if kernels and fn.__name__ not in kernels:
                        continue
                    args = tuple(_describe_arg(a) for a in launch.args)
                    for c in launch.choice.configs:
                        job = Job(fn.__module__, fn.__name__, args, {**launch.constexprs, **c.kwargs},
                                  c.num_warps, c.num_stages, arch, _input_dtype(launch))
                        jobs.setdefault(job.key(), job).problems.append(label)
    return list(jobs.values())


# ------------------------------------------------------------------------------------- 3. compiling
class _FakeDtype:
    """What Triton's binder reads of a torch dtype: its str ("torch.float16")."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


_FAKE_DTYPES: dict = {}  # kept alive for the whole process: Triton caches dtype objects by identity


class _FakePointer:
    def __init__(self, dtype: str, offset: int):
        self.dtype = _FAKE_DTYPES.setdefault(dtype, _FakeDtype(dtype))
        self._ptr = (1 << 20) + offset

    def data_ptr(self):
        return self._ptr


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_numbers(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(regs[-1]) if regs else None,
        "spill_bytes": sum(int(s) + int(l) for s, l in spills) if spills else None,
    }


def _run_ptxas(ptx: str, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
        return done.stdout + done.stderr


def _sass_counts(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    count = lambda *names: sum(1 for o in ops if o in names)  # noqa: E731
    return {
        "mma": {"hgmma": count("HGMMA"), "hmma": count("HMMA")},
        "loads": {"cp_async": count("LDGSTS"), "tma": count("UTMALDG", "UBLKCP", "UTMAPF")},
    }


def _blocks_per_sm(regs, shared: int, warps: int, cap: int):
    if regs is None:
        return None
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in 256-register chunks
    by_regs = REGS_PER_SM // (per_warp * warps) if per_warp else MAX_BLOCKS_PER_SM
    by_smem = SMEM_PER_SM[cap] // (shared + 1024) if shared else MAX_BLOCKS_PER_SM  # 1 KB reserved per block
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM))


def compile_job(job: Job) -> dict:
    """Compile one job; the result row (never raises: a failure is a row with ok False)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cap = ARCHS[job.arch]
    row = {"kernel": job.kernel, "arch": job.arch,
           "config": {**job.constexprs, "num_warps": job.num_warps, "num_stages": job.num_stages, "dtype": job.dtype},
           "problems": job.problems, "ok": False, "error": None, "registers": None, "spill_bytes": None,
           "shared_bytes": None, "blocks_per_sm": None, "mma": None, "loads": None, "seconds": None}
    t0 = time.time()
    try:
        kernel = getattr(importlib.import_module(job.kernel_module), job.kernel)
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        args = [(_FakePointer(a[1], a[2]) if isinstance(a, tuple) else a) for a in job.args]
        kwargs = dict(job.constexprs, num_warps=job.num_warps, num_stages=job.num_stages)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        numbers = _ptxas_numbers(log.getvalue())
        if numbers["registers"] is None:  # a Triton cache hit skips ptxas: ask it ourselves
            numbers = _ptxas_numbers(_run_ptxas(compiled.asm["ptx"], "sm_90a" if cap == 90 else f"sm_{cap}"))
        shared = int(compiled.metadata.shared)
        row.update(numbers, ok=True, shared_bytes=shared, **_sass_counts(compiled.asm["cubin"]))
        row["blocks_per_sm"] = _blocks_per_sm(row["registers"], shared, job.num_warps, cap)
    except Exception as e:  # noqa: BLE001 - every failure is reported as a row
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    row["seconds"] = round(time.time() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------- 4. rules
def violations(row: dict) -> list:
    """The gate's rules for one compile; an empty list passes."""
    if not row["ok"]:
        return [f"compile failed: {(row['error'] or '').splitlines()[0][:200]}"]
    out = []
    cap = ARCHS[row["arch"]]
    if row["shared_bytes"] > SMEM_PER_BLOCK[cap]:
        out.append(f"shared memory {row['shared_bytes']} B > {SMEM_PER_BLOCK[cap]} B ({row['arch']})")
    sixteen_bit = row["config"]["dtype"] in ("bf16", "fp16")
    if sixteen_bit and (row["spill_bytes"] or 0) > 0:
        out.append(f"16-bit config spills {row['spill_bytes']} B")
    gemm = row["kernel"] in MAIN_LOOP_KERNELS
    if row["kernel"] == "patch_embed_dw_kernel" and not row["config"].get("WANT_W"):
        gemm = False  # d(pos) alone is a sum over the batch: no GEMM in that variant
    if sixteen_bit and cap == 90 and gemm and row["mma"]["hgmma"] == 0:
        out.append("16-bit main loop without wgmma (HGMMA) on sm_90a")
    return out


def _config_text(config: dict) -> str:
    skip = {"dtype", "num_warps", "num_stages", "DOT_PRECISION"}
    blocks = " ".join(f"{k}={v}" for k, v in config.items() if k.startswith("BLOCK") or k == "GROUP_M")
    flags = " ".join(f"{k}" for k, v in config.items() if k not in skip and v is True)
    return f"{blocks} w{config['num_warps']}s{config['num_stages']} {flags}".strip()


def print_table(rows: list) -> None:
    head = f"{'kernel':24} {'arch':7} {'dtype':5} {'config':58} {'regs':>4} {'spill':>5} {'smem':>7} " \
           f"{'blk/SM':>6} {'wgmma':>5} {'mma':>4} {'cp.as':>5} {'tma':>3}  verdict"
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["config"]["dtype"], _config_text(r["config"]))):
        bad = violations(r)
        if r["ok"]:
            nums = (f"{r['registers'] if r['registers'] is not None else '?':>4} {r['spill_bytes'] or 0:>5} "
                    f"{r['shared_bytes']:>7} {r['blocks_per_sm'] if r['blocks_per_sm'] is not None else '?':>6} "
                    f"{r['mma']['hgmma']:>5} {r['mma']['hmma']:>4} {r['loads']['cp_async']:>5} {r['loads']['tma']:>3}")
        else:
            nums = f"{'':>44}"
        print(f"{r['kernel'][:24]:24} {r['arch']:7} {r['config']['dtype']:5} {_config_text(r['config'])[:58]:58} "
              f"{nums}  {'FAIL: ' + '; '.join(bad) if bad else 'ok'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sm_90a", "sm_80"], choices=sorted(ARCHS))
    parser.add_argument("--subset", default="all", choices=["all", "gpu-run"],
                        help="all problems, or those benchmarks/gpu_check.sh runs (16-bit, benchmark shapes)")
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--kernel", nargs="+", help="only these @triton.jit kernels (by name)")
    parser.add_argument("--json", help="write one JSON object per compile to this file (JSON lines)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = parser.parse_args(argv)

    import triton

    t0 = time.time()
    jobs = collect_jobs(args.family, args.subset, args.arch, args.kernel)
    print(f"kernel_report: {len(jobs)} compiles ({', '.join(args.arch)}; Triton {triton.__version__}, "
          f"{args.jobs} processes)", flush=True)
    rows = []
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(args.jobs))
            results = pool.imap_unordered(compile_job, jobs, chunksize=1)
        else:
            results = map(compile_job, jobs)
        for row in results:
            rows.append(row)
            if len(rows) % 50 == 0:
                print(f"  {len(rows)}/{len(jobs)} compiled ({time.time() - t0:.0f} s)", flush=True)
    for r in rows:
        r["triton"] = triton.__version__
    failed = [r for r in rows if violations(r)]
    if args.quiet:
        if failed:
            print_table(failed)
    else:
        print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "violations": violations(r)}) + "\n")
    print(f"kernel_report: {len(rows) - len(failed)}/{len(rows)} compiles pass the gate "
          f"({time.time() - t0:.0f} s, Triton {triton.__version__})")
    for r in failed:
        print(f"  FAIL {r['kernel']} {r['arch']} {r['config']['dtype']} {_config_text(r['config'])}: "
              f"{'; '.join(violations(r))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
