"""Multi-process training without a per-step GPU sync, and preemption under torchrun.

- Preemption (CPU, gloo, 2 processes): a scheduler signals the whole job (torchrun and its workers); every
  rank stops after the same step, saves, and exits 75, and ``--resume`` logs the same lines, bit for bit, as
  an uninterrupted 2-process run.
- On CUDA: the loop's step (``loop.advance``: batch, train_step, loss window) makes no device sync between
  log steps, under ``torch.cuda.set_sync_debug_mode("error")``. CPU machines skip it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from aimkern.train import checkpoint as ckpt
from aimkern.train.errors import PREEMPTED_EXIT_CODE
from aimkern.train.metering import WALL_CLOCK
from conftest import HAS_CUDA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--log-every", "2", "--no-progress", "--save-every", "0", "--device", "cpu",
        "--img-size", "16"]
# Each worker writes its pid when it starts and its exit status when it ends (torchrun reports only its own).
WORKER = """\
import json, os, sys
probe = os.environ["AIMKERN_TEST_PROBE"]
rank = os.environ["RANK"]
with open(os.path.join(probe, "pid-" + rank), "w") as f:
    f.write(str(os.getpid()))
from aimkern.train.__main__ import main
status = {"code": 0, "step": None}
try:
    main(sys.argv[1:])
except SystemExit as e:
    status = {"code": e.code, "step": getattr(e, "step", None)}
    raise
finally:
    with open(os.path.join(probe, "exit-" + rank + ".json"), "w") as f:
        json.dump(status, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name, *args):
    """torchrun with 2 CPU workers in a session of its own (as a scheduler's job is); the probe folder."""
    probe = tmp_path / f"probe-{name}"
    probe.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(tmp_path / "worker.py"),
           *TINY, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", AIMKERN_TEST_PROBE=str(probe))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, probe


def _finish(proc, timeout=240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _statuses(probe) -> list:
    return [json.loads((probe / f"exit-{rank}.json").read_text()) for rank in (0, 1)]


def _lines(out) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: {k: v for k, v in r.items() if k not in WALL_CLOCK} for r in map(json.loads, f)}


def _wait_for_training(proc, out, probe, deadline_s=180) -> None:
    """Until both workers run and rank 0 logged a line (the job is in its loop)."""
    deadline = time.monotonic() + deadline_s
    metrics = os.path.join(out, "metrics.jsonl")
    while time.monotonic() < deadline and proc.poll() is None:
        pids = [probe / f"pid-{r}" for r in (0, 1)]
        if all(p.exists() for p in pids) and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
            return
        time.sleep(0.02)
    pytest.fail(f"the job never started training: {_finish(proc)[-3000:]}")


def test_sigterm_to_the_whole_torchrun_job_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path):
    out = tmp_path / "preempted"
    proc, probe = _launch(tmp_path, "preempted", "--steps", 400, "--out", out)
    _wait_for_training(proc, out, probe)
    workers = [int((probe / f"pid-{r}").read_text()) for r in (0, 1)]
    for pid in [proc.pid, *workers]:  # what a scheduler does (Slurm's scancel, a preempted pod): every process
        os.kill(pid, signal.SIGTERM)
    text = _finish(proc)
    statuses = _statuses(probe)
    assert [s["code"] for s in statuses] == [PREEMPTED_EXIT_CODE] * 2, text[-3000:]
    stopped = statuses[0]["step"]
    assert statuses[1]["step"] == stopped and 2 <= stopped < 400  # the same step on every rank
    state = ckpt.load(ckpt.checkpoint_path(out))
    assert state["step"] == stopped and state["world_size"] == 2 and len(state["rng"]) == 2
    assert "SIGTERM received: stopped after step" in text and proc.returncode != 0  # torchrun's own status
    target = stopped + 3  # past the stop, and odd: --stop-at between log steps
    straight_proc, _ = _launch(tmp_path, "straight", "--steps", 400, "--stop-at", target, "--out", tmp_path / "b")
    assert straight_proc.wait(timeout=240) == 0, _finish(straight_proc)[-3000:]
    resumed_proc, resumed_probe = _launch(tmp_path, "resumed", "--steps", 400, "--stop-at", target, "--resume",
                                          "--out", out)
    resumed_text = _finish(resumed_proc)
    assert resumed_proc.returncode == 0, resumed_text[-3000:]
    assert f"at step {stopped}" in resumed_text and [s["code"] for s in _statuses(resumed_probe)] == [0, 0]
    straight, resumed = _lines(tmp_path / "b"), _lines(out)
    assert sorted(straight) == list(range(2, target + 1, 2))
    assert resumed == straight  # every line, bit for bit, wall-clock fields aside


# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: on a CPU there is no device sync to catch, so CPU CI does "
                    "not check the loop's no-sync rule; benchmarks/gpu_check.sh's gputests stage runs it")
def test_cuda_step_loop_makes_no_device_sync_between_log_steps(tmp_path):
    from aimkern.distributed import setup
    from aimkern.train import parse_args
    from aimkern.train.loop import advance
    from aimkern.train.session import open_session

    args = parse_args(["--device", "cuda", "--batch-size", "16", "--steps", "20", "--log-every", "20", "--no-progress",
                       "--save-every", "0", "--out", str(tmp_path)])
    session = open_session(args, setup(args.device))
    for step in range(3):  # warm-up: lazy initialization, autotuning and the allocator's first blocks may sync
        advance(session, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 10):
            advance(session, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert session.window.count > 0 and torch.isfinite(session.window.sum)
