"""python -m aimkern.train on WebDataset shards: pack -> train -> stop -> --resume is bit-identical on the
CPU (also with --workers changed and a corrupt sample in the data), and 2 gloo processes read disjoint
halves of every global batch that together cover the epoch, taking the same steps as 1 process."""
import json
import os
import subprocess
import sys

import pytest

from data_helpers import N_IMAGES, make_folder

pytest.importorskip("webdataset")
pytest.importorskip("wids")
pytest.importorskip("torchvision")

from aimkern.data.__main__ import main as data_main  # noqa: E402
from aimkern.train import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--log-every", "1", "--no-progress", "--save-every", "0", "--device", "cpu"]


def run(data, out, *extra, steps):
    train([*TINY, "--data", str(data), "--steps", str(steps), "--out", str(out), *map(str, extra)])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_pack_train_stop_resume_is_exact_on_shards(tmp_path, capfd):
    src = make_folder(tmp_path / "folder", extras=True)  # 24 JPEGs, a grayscale PNG, a corrupt JPEG
    data_main(["pack", src, str(tmp_path / "shards"), "--shard-size", "6", "--no-progress"])
    shards = str(tmp_path / "shards" / "train-{000000..000004}.tar")
    bound = ("--max-bad-samples", 1)  # one corrupt file of 26 is more than the default fraction allows
    straight = run(shards, tmp_path / "a", "--workers", 0, *bound, steps=6)
    before = run(shards, tmp_path / "b", "--workers", 2, "--stop-at", 3, *bound, steps=6)
    assert sorted(before) == [1, 2, 3]
    after = run(shards, tmp_path / "b", "--workers", 1, "--resume", *bound, steps=6)
    assert after == straight  # bit-exact: same floats at every step, whatever the workers
    assert len(set(straight.values())) == 6
    # 6 steps of 8 = 2 epochs of 26: the corrupt one is met, and the trainer reports it
    assert "aimkern.train: skipped bad sample" in capfd.readouterr().err
    with open(os.path.join(tmp_path / "a", "summary.json")) as f:
        assert json.load(f)["bad_samples"] >= 1


def test_two_gloo_processes_split_every_batch_and_cover_the_epoch(tmp_path):
    data_main(["pack", make_folder(tmp_path / "folder"), str(tmp_path / "shards"), "--shard-size", "5",
               "--no-progress"])
    shards = str(tmp_path / "shards")
    steps = N_IMAGES // 8  # one epoch
    single = run(shards, tmp_path / "one", "--workers", 0, steps=steps)
    # Each rank records the ids of the images its stream yields (the image's colour encodes its id).
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        "from aimkern.data import shard_stream as stream\n"
        "from aimkern.train import train\n"
        "from data_helpers import ids_of\n"
        "seen, iterate = [], stream.ShardStream.__iter__\n"
        "def recording(self):\n"
        "    for images in iterate(self):\n"
        "        seen.append(ids_of(images))\n"
        "        yield images\n"
        "stream.ShardStream.__iter__ = recording\n"
        "train(sys.argv[1:])\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "json.dump(seen, open(os.path.join(out, 'seen-%s.json' % os.environ['RANK']), 'w'))\n"
    )
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(probe),
           *TINY, "--data", shards, "--workers", "1", "--steps", str(steps), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.load(open(out / f"seen-{r}.json")) for r in (0, 1)]
    assert [len(s) for s in seen] == [steps, steps] and all(len(b) == 4 for s in seen for b in s)
    ranks = [set(i for b in s for i in b) for s in seen]
    assert not ranks[0] & ranks[1]  # disjoint
    assert sorted(i for s in seen for b in s for i in b) == list(range(N_IMAGES))  # together: the epoch, once
    with open(out / "metrics.jsonl") as f:
        two = {r["step"]: r["loss"] for r in map(json.loads, f)}
    assert sorted(two) == sorted(single)
    for step, value in two.items():
        assert value == pytest.approx(single[step], rel=1e-5, abs=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
