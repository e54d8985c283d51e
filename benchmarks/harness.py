"""The one peers x shapes loop of the op benchmarks (attention, patch embed, pixel loss, cross-entropy).

A benchmark script gives its op's spec (``aimkern.specs.OpSpec``; ``bench_cases.BENCH[op]`` holds the shapes
and which candidates are peers, under which names), its truly specific extra peers (a compiled
FlexAttention, a torch.compile'd reference, ...), a function from one of its shapes to a ``Problem`` and its
work formula. ``measure`` then runs, for every shape, pass ("fwd", "fwd+bwd") and peer:

  1. the peer's support rule on the problem: an unsupported peer is skipped with its reason;
  2. one call (compiles, autotuning, allocator warm-up: kept out of the timing, and a peer that raises
     here is skipped with the error, never a crash of the whole run);
  3. the median ms: ``triton.testing.do_bench`` on CUDA, the wall clock on the CPU;
  4. the peak memory beyond what was live before (CUDA only).

Each result keeps its work (FLOPs and / or bytes that must move) so the script's rows get TFLOP/s and GB/s.
``write`` prints the table and writes the JSON (``rows``, ``skipped`` with each reason, ``env``) and the PNG
(``bar_chart``; matplotlib when installed) through common.write_report.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from common import peak_extra_mib, time_ms, wall_ms, write_report

import aimkern
from aimkern.specs import Candidate, OpSpec, Problem, outputs
from bench_cases import BENCH

PASSES = ("fwd", "fwd+bwd")
GPU_TIMING = (25, 100)  # do_bench's warm-up and repetition ms, as the scripts have always timed
CPU_TIMING = (2, 20)  # a CPU run's tiny shapes show that the peers run, not how fast: keep it short
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PUBLIC_OP = "backend=triton"  # a bench "peers" value: the public op forced onto aimkern's Triton path
INTERPRETER_NOT_TIMED = "Triton on CPU runs under its interpreter: a correctness tool, not timed"
COMPILE_CUDA_ONLY = "torch.compile peers are timed on CUDA only (an Inductor CPU compile would dominate the run)"


def _applies(problem: Problem) -> Optional[str]:
    return None


@dataclass
class Peer:
    """One column (or row label) of a benchmark.

    name:        the label in the table and the JSON.
    build:       problem -> a function called as the spec's candidates are, ``fn(*tensors, params)``, built
                 once per shape and pass (a compile or a block mask made here is kept out of the timing).
    unsupported: problem -> None where the peer applies, else the reason it does not.
    options:     the peer's own params on top of the shape's (e.g. SDPA's atomic backward needs
                 deterministic=False); they enter its problem, so its support rule sees them too.
    passes:      the passes it is timed in.
    check:       (fn, args, pass) -> extra columns (dict) or None, run once before timing (``args``: the
                 tensors and the params ``fn`` is timed on); an exception skips the peer with the reason
                 (a column must time what it says).
    """

    name: str
    build: Callable[[Problem], Callable]
    unsupported: Callable[[Problem], Optional[str]] = _applies
    options: dict = field(default_factory=dict)
    passes: tuple = PASSES
    check: Optional[Callable] = None

    def restricted(self, rule: Callable[[Problem], Optional[str]]) -> "Peer":
        """This peer, also skipped where ``rule(problem)`` gives a reason."""
        first = self.unsupported
        return Peer(self.name, self.build, lambda p: first(p) or rule(p), self.options, self.passes, self.check)


def candidate_peer(cand: Candidate, name: Optional[str] = None, options: Optional[dict] = None) -> Peer:
    """A spec candidate as a peer; Triton's interpreter (a CPU run of a Triton path) is not timed."""

    def unsupported(problem: Problem) -> Optional[str]:
        if cand.interpreted and problem.device_type == "cpu":
            return INTERPRETER_NOT_TIMED
        return cand.unsupported(problem)

    return Peer(name or cand.name, lambda problem: cand.fn, unsupported, dict(options or {}))


def public_peer(spec: OpSpec, name: str = "aimkern") -> Peer:
    """The public op with ``backend="triton"``: what a user forcing aimkern gets (its launch policy picks the
    backward path). It applies where any of the spec's aimkern candidates does."""
    op = getattr(aimkern, spec.name)
    paths = [c for c in spec.candidates if c.kind == "aimkern"]

    def unsupported(problem: Problem) -> Optional[str]:
        if problem.device_type == "cpu":
            return INTERPRETER_NOT_TIMED
        reasons = [c.unsupported(problem) for c in paths]
        return None if any(r is None for r in reasons) else "; ".join(r for r in reasons if r)

    def build(problem: Problem) -> Callable:
        def run(*args):
            call_args, kwargs = spec.public_call(args[:-1], args[-1])
            return op(*call_args, backend="triton", **kwargs)

        return run

    return Peer(name, build, unsupported)


def cuda_only(problem: Problem) -> Optional[str]:
    """The support rule of a compiled peer."""
    return None if problem.device_type == "cuda" else COMPILE_CUDA_ONLY


def compiled_peer(name: str, fn: Callable, passes: tuple = PASSES) -> Peer:
    """``torch.compile(fn)``, compiled afresh for every shape (no recompile-limit surprises across a sweep)."""
    return Peer(name, lambda problem: torch.compile(fn), cuda_only, passes=passes)


def spec_peers(spec: OpSpec, *, all_candidates: bool = False) -> list:
    """The peers ``BENCH[spec.name]["peers"]`` names (label -> candidate name, ``(name, params changes)`` or
    PUBLIC_OP), in its order; with ``all_candidates`` also every other candidate of the spec under its own
    name."""
    peers, used = [], set()
    paths = [c.name for c in spec.candidates if c.kind == "aimkern"]
    for label, source in BENCH[spec.name]["peers"].items():
        if source == PUBLIC_OP:
            peers.append(public_peer(spec, label))
            used.update(paths if len(paths) == 1 else ())  # the public op is then that one path
            continue
        cand_name, options = (source, {}) if isinstance(source, str) else source
        used.add(cand_name)
        peers.append(candidate_peer(spec.candidate(cand_name), label, options))
    if all_candidates:
        peers += [candidate_peer(c) for c in spec.candidates if c.name not in used and c.kind != "user"]
    return peers


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Result:
    """One (shape, pass, peer): ``ms`` and ``mib`` None when it was skipped, and then ``reason`` says why."""

    case: dict
    peer: str
    pass_: str
    work: dict
    ms: Optional[float] = None
    mib: Optional[float] = None
    reason: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def tflops(self) -> Optional[float]:
        flop = self.work.get("flop")
        return flop / self.ms / 1e9 if flop and self.ms else None

    @property
    def gbps(self) -> Optional[float]:
        nbytes = self.work.get("bytes")
        return nbytes / self.ms / 1e6 if nbytes and self.ms else None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _upstream(outs: tuple, cache: dict) -> list:
    """One seeded upstream gradient per output shape of a shape, shared by its peers."""
    grads = []
    for o in outs:
        key = tuple(o.shape)
        if key not in cache:
            cache[key] = torch.randn(key, generator=torch.Generator().manual_seed(1)).to(o.device)
        grads.append(cache[key].to(o.dtype))
    return grads


def _steps(fn: Callable, args: tuple, grad_inputs: list, cache: dict) -> dict:
    def fwd():
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd():
        outs = [o for o in outputs(fn(*args)) if o.requires_grad]
        return torch.autograd.grad(outs, grad_inputs, _upstream(outs, cache))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _one(spec: OpSpec, peer: Peer, res: Result, problem: Problem, tensors: tuple, cache: dict,
         timing: tuple) -> Result:
    if res.pass_ not in peer.passes:
        res.reason = f"timed in {', '.join(peer.passes)} only"
        return res
    if peer.options:
        problem = problem.with_(params=dict(peer.options))
    res.reason = peer.unsupported(problem)
    if res.reason:
        return res
    cuda = problem.device_type == "cuda"
    args = (*tensors, problem.params)
    grad_inputs = [t for t, rg in zip(tensors, problem.requires_grad) if rg]
    stage = "build"
    try:
        fn = peer.build(problem)
        if peer.check is not None:
            stage = "check"
            res.info = peer.check(fn, args, res.pass_) or {}
        step = _steps(fn, args, grad_inputs, cache)[res.pass_]
        stage = "first call"
        step()  # compile, autotune, warm the allocator: kept out of the timing
        if cuda:
            torch.cuda.synchronize()
        stage = "timing"
        res.ms = time_ms(step, *timing) if cuda else wall_ms(step, *timing)
        stage = "peak memory"
        res.mib = peak_extra_mib(step) if cuda else None
    except Exception as e:  # noqa: BLE001 - a failing peer is reported and skipped, never fatal
        if res.ms is None:  # a failed peak-memory run keeps the time
            res.reason = f"{stage} failed: {_why(e)}"
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return res


def measure(spec: OpSpec, cases: Sequence[dict], problem_of: Callable[[dict, bool], Problem], peers: Sequence[Peer],
            *, passes: Sequence[str] = PASSES, work: Optional[Callable] = None, timing: Optional[tuple] = None) -> list:
    """Results of every case x pass x peer (skipped ones included, with their reason).

    problem_of(case, grad) gives the case's problem (grad: the inputs that take a gradient in fwd+bwd);
    the inputs are made once per case from its fwd+bwd problem (``spec.make_inputs``) and the forward runs
    under no_grad. work(case, problem, tensors, pass) -> {"flop": ..., "bytes": ...} (either may be absent).
    timing: (warm-up, repetition) in ms, do_bench's meaning (the CPU wall clock reads it the same way);
    default GPU_TIMING on CUDA, CPU_TIMING on the CPU.
    """
    results = []
    for case in cases:
        first = problem_of(case, True)
        timing = timing or (GPU_TIMING if first.device_type == "cuda" else CPU_TIMING)
        label = " ".join(f"{k}={v}" for k, v in case.items())
        try:
            tensors = spec.make_inputs(first, torch.Generator().manual_seed(0))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the case is reported, the run goes on
            why = f"making the inputs failed: {_why(e)}"
            print(f"{label}: {why}", flush=True)
            results += [Result(dict(case), p.name, pass_, {}, reason=why) for pass_ in passes for p in peers]
            continue
        cache: dict = {}
        for pass_ in passes:
            problem = problem_of(case, pass_ == "fwd+bwd")
            w = work(case, problem, tensors, pass_) if work is not None else {}
            for peer in peers:
                print(f"{label} {pass_} {peer.name} ...", flush=True)
                res = _one(spec, peer, Result(dict(case), peer.name, pass_, w), problem, tensors, cache, timing)
                results.append(res)
                if res.reason:
                    print(f"  skipped: {res.reason}", flush=True)
        del tensors, cache
        if first.device_type == "cuda":
            torch.cuda.empty_cache()  # the next case's inputs may be larger
    return results


# --------------------------------------------------------------------------------------------- reporting
def wide_rows(results: Sequence[Result], derive: Optional[Callable[[dict, dict], None]] = None) -> list:
    """One row per (case, pass) with a "<peer> ms" and a "<peer> extra MiB" column per peer, plus the checks'
    columns (the attention table's layout). derive(row, {peer: Result}) adds the script's own columns."""
    groups: dict = {}
    for r in results:
        groups.setdefault((tuple(r.case.items()), r.pass_), {})[r.peer] = r
    rows = []
    for (case, pass_), by_peer in groups.items():
        row = {**dict(case), "pass": pass_}
        for r in by_peer.values():
            row[f"{r.peer} ms"] = r.ms
            row[f"{r.peer} extra MiB"] = r.mib
            row.update(r.info)
        if derive is not None:
            derive(row, by_peer)
        rows.append(row)
    return rows


def skipped(results: Sequence[Result]) -> list:
    return [{**r.case, "peer": r.peer, "pass": r.pass_, "reason": r.reason} for r in results if r.reason]


def write(name: str, rows: Sequence[dict], columns: Sequence[str], results: Sequence[Result], *,
          chart: Optional[Callable] = None, device: str = "cuda", out_dir: Optional[str] = None) -> str:
    """The table on stdout (``measure`` printed each skip as it happened), ``out/<name>.json`` ({"env", "rows",
    "skipped": [{case..., "peer", "pass", "reason"}]}) and the PNG. A CPU run writes ``<name>_cpu.*`` (a GPU
    run's report beside it stays its own) and its table leaves out the columns nobody filled (most peers are
    CUDA-only; the JSON rows keep every key)."""
    if device == "cpu":
        name = f"{name}_cpu"
        columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
    where = {"out_dir": out_dir} if out_dir else {}  # default: $AIMKERN_BENCH_OUT or benchmarks/out
    return write_report(name, rows, columns, chart=chart, extra={"skipped": skipped(results)}, **where)


def bar_chart(points: Sequence[tuple], *, ylabel: str, title: str, log: bool = False,
              hline: Optional[tuple] = None) -> Callable:
    """draw(ax) of grouped bars from (group, bar, value) points; a missing value draws as 0.
    hline: (y, label) of a dashed reference line (a ceiling)."""
    groups = list(dict.fromkeys(g for g, _, _ in points))
    bars = list(dict.fromkeys(b for _, b, _ in points))
    value = {(g, b): v for g, b, v in points}

    def draw(ax):
        width = 0.8 / max(1, len(bars))
        for i, b in enumerate(bars):
            ax.bar([j + i * width for j in range(len(groups))], [value.get((g, b)) or 0.0 for g in groups],
                   width, label=b)
        if hline is not None:
            ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)

    return draw


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# ---------------------------------------------------------------------------------------------------- CLI
def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every op benchmark shares; a script adds its own shape flags."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the spec's quick shapes (gpu_check.sh)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--all-candidates", action="store_true",
                    help="also time the spec's candidates that are not named peers (always on the CPU)")
    return ap


def dtype(args, device: str) -> str:
    """--dtype, else bf16 on CUDA (what the benchmarks are about) and fp32 on the CPU (bf16 matmuls are slow
    there, and Triton's interpreter gets bf16 wrong)."""
    return args.dtype or ("bf16" if device == "cuda" else "fp32")


def cases(spec: OpSpec, args, device: str) -> list:
    """The spec's benchmark shapes for this run: "cpu" (tiny) on the CPU, "quick" with --quick, else "shapes"."""
    bench = BENCH[spec.name]
    key = "cpu" if device == "cpu" else ("quick" if args.quick and "quick" in bench else "shapes")
    return [dict(c) for c in bench[key]]


def cpu_notice(name: str) -> None:
    print(f"{name}: timing the peers that run on this CPU at the spec's tiny shapes (wall clock; the output "
          f"goes to {name}_cpu.json)")
