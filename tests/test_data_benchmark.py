"""benchmarks/data_throughput.py in its small CPU form: it times every reader and the bare-PIL anchor, reports
each reader's ratio to the anchor and the cores needed for the step goals, and writes its JSON (the CI guard
against the script drifting from aimkern.data / aimkern.train)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("webdataset")
pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_throughput_quick(tmp_path):
    env = dict(os.environ, AIMKERN_BENCH_OUT=str(tmp_path))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data_throughput.py"), "--quick"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vit-b16" in run.stdout and "aim-600m" in run.stdout and "cores/GPU" in run.stdout
    with open(tmp_path / "data_throughput.json") as f:
        rows = json.load(f)["rows"]
    readers = {r["reader"] for r in rows}
    assert {"anchor-pil", "imagefolder", "shards-full", "shards-draft"} <= readers
    assert all(r["img_per_s"] > 0 and r["img_per_s_per_core"] > 0 and r["vs_anchor"] > 0 for r in rows)
    # every reader's ratio is against the anchor of its own image set, timed in the same run
    for r in rows:
        anchor = next(a for a in rows if a["reader"] == "anchor-pil" and a["image"] == r["image"])
        assert r["vs_anchor"] == pytest.approx(r["img_per_s_per_core"] / anchor["img_per_s_per_core"])
    assert "goal: shards-draft, 1 worker(s)" in run.stdout
