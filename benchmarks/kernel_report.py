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
a compile error, shared memory over the arch's limit or over its Choice's bound (``Choice.shared``, by
which the launch layer keeps the configs that fit a device), a 16-bit config that spills, or an sm_90a
16-bit main-loop kernel without wgmma. ``--subset gpu-run`` keeps the problems the GPU check runs
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_problems import FAMILIES  # noqa: E402

ARCHS = {"sm_90a": 90, "sm_80": 80}
# Max dynamic shared memory per block (opt-in) and per SM, bytes.
SMEM_PER_BLOCK = {90: 232448, 80: 166912}
SMEM_PER_SM = {90: 233472, 80: 167936}
# A Choice without a shared-memory bound (Choice.shared None) promises a few KB at most.
SMALL_SHARED = 16384
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
# Kernels whose main loop is a tensor-core GEMM: on sm_90a their 16-bit builds must use wgmma.
MAIN_LOOP_KERNELS = {
    "attn_fwd_kernel", "attn_fwd_tail_kernel", "attn_bwd_tiled_kernel", "attn_bwd_key_tail_kernel",
    "attn_bwd_fused_kernel",
    "ce_fwd_kernel", "ce_dlogits_kernel", "matmul_kernel",
    "patch_embed_fwd_kernel", "patch_embed_dx_kernel", "patch_embed_dw_kernel",
}

# Attention kernels whose every dot must be wgmma on sm_90a in 16-bit (no HMMA at all): their tiles keep
# 64-row slabs in every dot (key-major forms where a tile is narrow). The one exception is the tiled
# backward at D = 256, whose 64-key tiles spill 2.8-4.3 KB: it runs 32 key rows on mma.sync.
WGMMA_ONLY_KERNELS = {
    "attn_fwd_kernel", "attn_fwd_tail_kernel", "attn_bwd_tiled_kernel", "attn_bwd_key_tail_kernel",
    "attn_bwd_fused_kernel",
}


def _hmma_allowed(row: dict) -> bool:
    return row["kernel"] == "attn_bwd_tiled_kernel" and row["config"].get("BLOCK_D") == 256


# -------------------------------------------------------------------------------- 1. compile jobs
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
    shared_estimate: object = None  # the Choice's bound (Choice.shared), None where it has none

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
                 torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8"}


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
                    elem = {"fp16": 2, "bf16": 2, "fp32": 4}[_input_dtype(launch)]
                    for c in launch.choice.configs:
                        shared = launch.choice.shared
                        job = Job(fn.__module__, fn.__name__, args, {**launch.constexprs, **c.kwargs},
                                  c.num_warps, c.num_stages, arch, _input_dtype(launch),
                                  shared_estimate=shared(c, launch.constexprs, elem) if shared else None)
                        jobs.setdefault(job.key(), job).problems.append(label)
    return list(jobs.values())


# ------------------------------------------------------------------------------------- 2. compiling
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
           "problems": job.problems, "shared_estimate": job.shared_estimate, "ok": False, "error": None,
           "registers": None, "spill_bytes": None,
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


# ----------------------------------------------------------------------------------------- 3. rules
def violations(row: dict) -> list:
    """The gate's rules for one compile; an empty list passes."""
    if not row["ok"]:
        return [f"compile failed: {(row['error'] or '').splitlines()[0][:200]}"]
    out = []
    cap = ARCHS[row["arch"]]
    if row["shared_bytes"] > SMEM_PER_BLOCK[cap]:
        out.append(f"shared memory {row['shared_bytes']} B > {SMEM_PER_BLOCK[cap]} B ({row['arch']})")
    if "shared_estimate" in row:  # the launch layer keeps the configs that fit a device by this bound
        bound = row["shared_estimate"] if row["shared_estimate"] is not None else SMALL_SHARED
        if row["shared_bytes"] > bound:
            out.append(f"shared memory {row['shared_bytes']} B over its Choice's bound {bound} B "
                       "(Choice.shared; aimkern.ops._launch.fit_to_device relies on it)")
    sixteen_bit = row["config"]["dtype"] in ("bf16", "fp16")
    if sixteen_bit and (row["spill_bytes"] or 0) > 0:
        out.append(f"16-bit config spills {row['spill_bytes']} B")
    gemm = row["kernel"] in MAIN_LOOP_KERNELS
    if row["kernel"] == "patch_embed_dw_kernel" and not row["config"].get("WANT_W"):
        gemm = False  # d(pos) alone is a sum over the batch: no GEMM in that variant
    if sixteen_bit and cap == 90 and gemm and row["mma"]["hgmma"] == 0:
        out.append("16-bit main loop without wgmma (HGMMA) on sm_90a")
    if (sixteen_bit and cap == 90 and row["kernel"] in WGMMA_ONLY_KERNELS and row["mma"]["hmma"] > 0
            and not _hmma_allowed(row)):
        out.append(f"{row['mma']['hmma']} mma.sync (HMMA) in a wgmma-only attention kernel on sm_90a")
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
