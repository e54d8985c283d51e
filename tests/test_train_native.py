"""python -m aimkern.train --native (issue 29, item 4): images at their own aspect ratio, packed first fit into
a fixed token budget; a stopped or killed run resumes to the uninterrupted run's metrics lines, with another
--workers, and a bad image is skipped by the seeded rule.
"""
import json
import math
import os
import random

import pytest
import torch

from aimkern.data.native import MAX_SKIPPED, NativePackStream, native_grid, native_view
from aimkern.train import train
from aimkern.train.native import max_images

pytest.importorskip("torchvision")  # --data DIR reads the file list with torchvision

SIZES = [(48, 36), (36, 48), (40, 40), (64, 36), (30, 22), (80, 60), (20, 60), (12, 12)]  # (w, h)
TINY = ["--preset", "vit-tiny", "--img-size", "16", "--native", "--max-patches", "16", "--tokens-per-batch", "40",
        "--log-every", "1", "--no-progress", "--device", "cpu", "--backend", "reference", "--max-bad-samples", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 PNGs of mixed sizes and aspect ratios in two classes, and one file that is no image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("native") / "data"
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        cls = root / "ab"[i % 2]
        os.makedirs(cls, exist_ok=True)
        w, h = SIZES[i % len(SIZES)]
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(cls / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not an image")
    return root


def records(out) -> dict:
    from aimkern.train.metering import WALL_CLOCK

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: {k: v for k, v in r.items() if k not in WALL_CLOCK} for r in map(json.loads, f)}


def run(folder, out, *extra, steps=6):
    return train([*TINY, "--data", str(folder), "--steps", str(steps), "--out", str(out), *map(str, extra)])


def test_grid_keeps_the_aspect_ratio_within_the_budget():
    for n in (16, 196, 256, 576, 1024):
        for w, h in ((640, 480), (480, 640), (500, 500), (1920, 1080), (100, 3000), (3000, 5)):
            rows, cols = native_grid(w, h, n, 16)
            assert 1 <= rows * cols <= n
            if max(1, w // 16) * max(1, h // 16) <= n:  # fits: its own grid, never enlarged
                assert (rows, cols) == (max(1, h // 16), max(1, w // 16))
            elif min(w / h, h / w) >= 0.25 and n >= 196:  # a larger usual photo: the grid fills the budget
                assert rows * cols >= 0.85 * n, (w, h, n, rows, cols)
                assert abs(math.log((cols / rows) / (w / h))) < 0.15, (w, h, n, rows, cols)


def test_crop_keeps_the_aspect_ratio_within_the_range():
    for seed in range(200):
        w, h = random.Random(seed).choice([(640, 480), (300, 900), (50, 50)])
        (left, top, right, bottom), _ = native_view(w, h, seed)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        if (right - left, bottom - top) != (w, h):
            ratio = ((right - left) / (bottom - top)) / (w / h)
            assert 3 / 4 * 0.9 <= ratio <= 4 / 3 * 1.1, (seed, ratio)  # rounding of small boxes
    assert native_view(640, 480, 7) == native_view(640, 480, 7)


def stream(folder, state=None, first_step=0, workers=0, tokens=40):
    return NativePackStream(str(folder), patch_size=4, in_chans=3, max_patches=16, tokens=tokens,
                            max_images=max_images(tokens, 16), offset=1, prefix=True, rank=0, world=1, seed=0,
                            first_step=first_step, workers=workers, state=state)


def test_packs_are_first_fit_fixed_shape_and_resume_from_their_state(folder):
    s = stream(folder)
    packs = [s.next_pack() for _ in range(3)]
    state = s.state()
    later = [s.next_pack() for _ in range(3)]
    for p in packs + later:  # fixed T, S and max_seqlen: a compiled step never sees new shapes
        assert p.num_tokens == 40 and p.num_sequences == max_images(40, 16) + 3 and p.max_seqlen == 16
        n = p.seqlens.tolist()
        assert all(k <= 16 for k in n) and all(k >= 1 for k in n[:p.num_images])
        pre = p.prefix_len.tolist()
        assert all(1 <= pre[i] <= n[i] - 1 for i in range(p.num_images) if n[i] >= 2)
        assert pre[p.num_images:] == n[p.num_images:]  # padding sequences: no target
        assert p.coords[:, 1].max() < 16 and p.grid.prod(1).tolist() == n
    again = stream(folder, state=state, first_step=3, workers=1)
    for want in later:
        got = again.next_pack()
        for name in ("patches", "cu_seqlens", "grid", "prefix_len"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert s.tokens_padding < s.tokens_total


def test_an_image_that_does_not_fit_waits_for_the_next_pack(folder):
    s = stream(folder, tokens=16)  # one full-budget image fills a pack: smaller later ones fill gaps first
    seen = []
    for _ in range(8):
        s.next_pack()
        seen.append(len(s.state()["pending"]))
    assert max(seen) >= 1 and max(seen) <= MAX_SKIPPED


@pytest.mark.slow
def test_stopped_and_killed_native_runs_resume_to_the_same_lines(folder, tmp_path, capsys):
    straight = run(folder, tmp_path / "straight", "--workers", 0, "--save-every", 2)
    lines = records(tmp_path / "straight")
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]
    assert straight["bad_samples"] >= 1 and straight["native"]["padding_fraction"] < 0.5
    said = capsys.readouterr().out
    assert "native packing:" in said and "learned 4 x 4 table, bilinearly resized to each image's grid" in said

    # --stop-at between saves (a checkpoint at the stop), resumed with another worker count
    run(folder, tmp_path / "stopped", "--workers", 0, "--save-every", 2, "--stop-at", 3)
    run(folder, tmp_path / "stopped", "--workers", 2, "--resume")
    assert records(tmp_path / "stopped") == lines

    # SIGKILL after step 3: the last checkpoint is step 2's, the log already has step 3's line
    out = tmp_path / "killed"
    run(folder, out, "--workers", 0, "--save-every", 2, "--stop-at", 3)
    os.remove(out / "checkpoint-00000003.pt")
    run(folder, out, "--workers", 1, "--resume")
    assert records(out) == lines


def test_native_options_are_checked_before_setup(folder, capsys):
    from aimkern.train import parse_args

    for argv, message in (
        (["--max-patches", "4"], "--max-patches needs --native"),
        (["--native"], "--native reads an ImageFolder directory or WebDataset shards"),
        (["--native", "--data", str(folder), "--max-patches", "100", "--tokens-per-batch", "50"],
         "--max-patches 100 must be at most --tokens-per-batch 50"),
        (["--native", "--data", str(folder), "--objective", "token"], "--native trains the pixel objective"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    args = parse_args(["--native", "--data", str(folder), "--batch-size", "8"])
    assert (args.max_patches, args.tokens_per_batch) == (64, 8 * 64)  # vit-tiny: 64 patches


@pytest.mark.slow
def test_native_run_on_shards_resumes_to_the_same_lines(folder, tmp_path):
    pytest.importorskip("webdataset")
    pytest.importorskip("wids")
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from data_helpers import pack_folder

    shards = pack_folder(folder, tmp_path / "shards", shard_size=7)
    run(shards, tmp_path / "straight", "--workers", 0, "--save-every", 2, steps=4)
    run(shards, tmp_path / "stopped", "--workers", 0, "--save-every", 2, "--stop-at", 2, steps=4)
    run(shards, tmp_path / "stopped", "--workers", 1, "--resume", steps=4)
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")
    assert sorted(records(tmp_path / "straight")) == [1, 2, 3, 4]


def test_preemption_mid_step_saves_the_packer_and_resumes_exactly(folder, tmp_path, monkeypatch):
    """SIGUSR1 during step 2 of a --native run: the step finishes, a checkpoint with the packer's position is
    saved, exit 75; --resume then logs the uninterrupted run's lines."""
    import signal

    import aimkern.train.native as native_module
    from aimkern.train import checkpoint as ckpt
    from aimkern.train.errors import PREEMPTED_EXIT_CODE

    straight = tmp_path / "straight"
    run(folder, straight, "--workers", 0, "--save-every", 0, steps=4)
    real = native_module.counted_targets

    def count_then_signal(pack, offset):
        if calls.append(1) or len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step: the step still finishes
        return real(pack, offset)

    calls = []
    monkeypatch.setattr(native_module, "counted_targets", count_then_signal)
    out = tmp_path / "preempted"
    with pytest.raises(SystemExit) as e:
        run(folder, out, "--workers", 0, "--save-every", 0, steps=4)
    saved = ckpt.load(ckpt.checkpoint_path(out))
    assert e.value.code == PREEMPTED_EXIT_CODE and saved["step"] == 2 and saved["data_state"][0]["next"] > 0
    monkeypatch.setattr(native_module, "counted_targets", real)
    run(folder, out, "--workers", 0, "--resume", steps=4)
    assert records(out) == records(straight)


def _torchrun(folder, out, *extra):
    """A 2-process (gloo, CPU) --native run; returns its combined output."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "aimkern.train", *TINY, "--data", str(folder), "--steps",
           "4", "--workers", "0", "--save-every", "2", "--out", str(out), *map(str, extra)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_torchrun_native_run_resumes_exactly_and_refuses_another_world(folder, tmp_path):
    """Two processes, each packing its own positions, the loss weighted by the global target count: a run
    stopped and resumed under torchrun logs the uninterrupted run's lines; one process may not resume it."""
    _torchrun(folder, tmp_path / "straight")
    _torchrun(folder, tmp_path / "stopped", "--stop-at", 3)
    _torchrun(folder, tmp_path / "stopped", "--resume")
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")
    assert sorted(records(tmp_path / "straight")) == [1, 2, 3, 4]
    from aimkern.train.errors import ResumeError

    with pytest.raises(ResumeError, match="written by 2 process"):
        run(folder, tmp_path / "stopped", "--resume", "--workers", 0, steps=5)


def test_activation_checkpointing_gives_the_same_native_steps(folder, tmp_path):
    run(folder, tmp_path / "plain", "--workers", 0, "--save-every", 0, steps=2)
    run(folder, tmp_path / "ckpt", "--workers", 0, "--save-every", 0, "--checkpointing", steps=2)
    assert records(tmp_path / "ckpt") == records(tmp_path / "plain")
