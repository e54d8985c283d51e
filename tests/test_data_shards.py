"""aimkern.data: shard specs (brace / directory / list / index), pack and index commands, the shard-window
order, draft-mode decode, the bad-sample rule, the stream's determinism and the --decode gpu refusal."""
import json
import os
import shutil

import pytest
import torch

from conftest import HAS_CUDA, requires_cuda
from data_helpers import N_IMAGES, ids_of, make_folder, pack_folder

pytest.importorskip("webdataset")
pytest.importorskip("wids")
pytest.importorskip("torchvision")  # pack lists the ImageFolder with torchvision

from aimkern.data import is_shard_spec, resolve_shards  # noqa: E402
from aimkern.data.__main__ import main as data_main  # noqa: E402
from aimkern.data.bad import BadRecord, load_or_replace  # noqa: E402
from aimkern.data.decode import decode_crop  # noqa: E402
from aimkern.data.order import ShardWindowOrder  # noqa: E402
from aimkern.data.shard_stream import ShardStream  # noqa: E402
from aimkern.train import parse_args  # noqa: E402
from aimkern.data.sources import make_stream  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return pack_folder(make_folder(root / "folder"), root / "shards")  # 24 samples in shards of 5


def stream(data, **kw):
    args = dict(img_size=32, in_chans=3, global_batch=8, rank=0, world=1, seed=0, start=0, workers=0, device=CPU)
    return ShardStream(data, **{**args, **kw})


# ------------------------------------------------------------------------------------------------------
def test_pack_writes_shards_and_an_index(shards):
    with open(os.path.join(shards, "index.json")) as f:
        desc = json.load(f)
    assert desc["wids_version"] == 1 and desc["classes"] == ["a", "b"]
    assert [s["nsamples"] for s in desc["shardlist"]] == [5, 5, 5, 5, 4]
    assert sorted(os.listdir(shards)) == ["index.json"] + [f"train-{i:06d}.tar" for i in range(5)]
    import webdataset as wds  # the shards are plain WebDataset: its own reader sees every sample once

    reader = wds.WebDataset(os.path.join(shards, "train-{000000..000004}.tar"), shardshuffle=False)
    keys = [s["__key__"] for s in reader]
    assert sorted(keys) == [f"{i:09d}" for i in range(N_IMAGES)]


def test_brace_directory_list_and_index_name_the_same_shards(shards, tmp_path):
    brace = os.path.join(shards, "train-{000000..000004}.tar")
    with open(tmp_path / "list.txt", "w") as f:
        f.write("# a shard list\n" + "".join(os.path.join(os.path.relpath(shards, tmp_path), f"train-{i:06d}.tar\n")
                                             for i in range(5)))
    specs = [brace, shards, str(tmp_path / "list.txt"), os.path.join(shards, "index.json")]
    lists = [resolve_shards(s) for s in specs]
    assert all(is_shard_spec(s) for s in specs)
    assert all(sl == lists[0] for sl in lists) and lists[0].total == N_IMAGES
    firsts = [next(iter(make_stream(s, img_size=32, in_chans=3, global_batch=8, rank=0, world=1, seed=0, start=0,
                                    device=CPU))) for s in specs]
    assert all(torch.equal(x, firsts[0]) for x in firsts)
    assert not is_shard_spec(os.path.join(shards, "train-{000007..000009}.tar"))
    assert not is_shard_spec(str(tmp_path))  # no .tar in it
    with pytest.raises(FileNotFoundError, match="1 of 6 shards"):
        resolve_shards(os.path.join(shards, "train-{000000..000005}.tar"))


def test_index_command_counts_shards_made_elsewhere(shards, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare, ignore=shutil.ignore_patterns("index.json"))
    assert resolve_shards(str(bare)).counts == (5, 5, 5, 5, 4)  # no index: counted by scanning, with a hint
    assert "aimkern.data index" in capsys.readouterr().err
    data_main(["index", str(bare / "train-{000000..000004}.tar"), "--no-progress"])
    assert "5 shard(s), 24 samples" in capsys.readouterr().out
    with open(bare / "index.json") as f:
        assert [s["nsamples"] for s in json.load(f)["shardlist"]] == [5, 5, 5, 5, 4]
    with pytest.raises(SystemExit, match="missing"):
        data_main(["index", str(bare / "train-{000000..000009}.tar"), "--no-progress"])


# ------------------------------------------------------------------------------------------------------
def test_shard_window_order_is_a_seeded_permutation_per_epoch():
    counts = [5, 3, 7, 1, 4, 6]
    order = ShardWindowOrder(counts, seed=3, window=2)
    n = sum(counts)
    epoch0, epoch1 = order.indices(torch.arange(n)), order.indices(torch.arange(n, 2 * n))
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    fresh = ShardWindowOrder(counts, seed=3, window=2).indices(torch.arange(9, 30))  # a resumed reader
    assert torch.equal(fresh, torch.cat([epoch0, epoch1])[9:30])
    assert not torch.equal(ShardWindowOrder(counts, seed=4, window=2).indices(torch.arange(n)), epoch0)
    # locality: the first window's positions all come from 2 shards
    starts = torch.cumsum(torch.tensor(counts), 0) - torch.tensor(counts)
    shard_of = torch.searchsorted(starts, epoch0, right=True) - 1
    first = order._epoch(0)[1][0]
    assert len(shard_of[:first].unique()) == 2


def test_stream_is_a_function_of_position_whatever_the_workers(shards):
    one = iter(stream(shards))
    batches = [next(one) for _ in range(4)]
    resumed = next(iter(stream(shards, start=16, workers=2)))
    assert torch.equal(resumed, batches[2])
    halves = [next(iter(stream(shards, rank=r, world=2, workers=1))) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), batches[0])
    epoch = sum((ids_of(b) for b in batches[:3]), [])
    assert sorted(epoch) == list(range(N_IMAGES))  # 3 batches of 8 = one pass over the 24 images
    assert batches[0].shape == (8, 3, 32, 32) and batches[0].dtype == torch.uint8  # normalized in the step


def _first_batch_and_bad(shards, start, workers):
    s = stream(shards, start=start, workers=workers)
    return next(iter(s)), s.take_bad()


def test_bad_samples_are_replaced_deterministically_and_handed_over_once(tmp_path, capfd):
    shards = pack_folder(make_folder(tmp_path / "folder", extras=True), tmp_path / "shards", shard_size=7)
    a = [_first_batch_and_bad(shards, s, w) for s, w in ((0, 0), (8, 1), (16, 2), (24, 0))]
    b = [_first_batch_and_bad(shards, s, w) for s, w in ((0, 2), (8, 0), (16, 1), (24, 1))]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    # Failures go to take_bad(), once in each pass over the epoch.
    bad = [f for _, failures in a + b for f in failures]
    assert len(bad) == 2 and all(isinstance(r, BadRecord) for r in bad), bad
    assert all(r.sample.endswith("]") and r.error in ("OSError", "UnidentifiedImageError") for r in bad), bad
    # Read step by step as the trainer does (a prefetching worker): each step's take_bad() holds the records
    # of that step's batch, the same as a stream resumed there finds, and nothing is handed over twice.
    s = stream(shards, workers=1)
    steps = [(batch, s.take_bad()) for _, batch in zip(range(4), s)]
    assert [r for _, r in steps] == [r for _, r in a] and s.take_bad() == []
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(steps, a))
    # Counting, reporting and bounding them is the trainer's (--max-bad-samples, over all ranks).
    assert capfd.readouterr().err.count("skipped bad sample") == 0

    def load(i):
        if i % 3 == 0:
            raise OSError(f"broken {i}")
        return i * 10

    got = [load_or_replace(load, i, n=30, seed=i + 100) for i in range(6)]
    assert got == [load_or_replace(load, i, n=30, seed=i + 100) for i in range(6)]
    assert got[1] == (10, []) and got[0][0] % 30 != 0 and got[0][1][0] == BadRecord("0", "OSError", "broken 0")
    with pytest.raises(RuntimeError, match="in a row"):
        load_or_replace(lambda i: load(0), 0, n=30, seed=1)

    def buggy(i):
        raise TypeError("a programming error")

    with pytest.raises(TypeError):  # not a decode error: it crashes, it is not skipped
        load_or_replace(buggy, 0, n=30, seed=1)


def test_draft_decode_matches_a_full_decode(tmp_path):
    """A 224-px crop of a 1024-px JPEG decodes at a DCT scale (draft) yet looks like the full decode."""
    from PIL import Image
    import io
    import numpy as np

    y, x = np.mgrid[0:768, 0:1024]
    pixels = np.stack([x / 4, y / 3, (x + y) / 7], -1).astype(np.uint8)  # smooth: scaling-friendly content
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for seed in range(4):
        full = decode_crop(data, 64, 3, seed, draft=False).float()
        fast = decode_crop(data, 64, 3, seed, draft=True).float()
        assert full.shape == fast.shape == (3, 64, 64)
        assert (full - fast).abs().mean() < 3.0, seed  # a few grey levels, from the DCT-domain scaling
    gray = decode_crop(data, 16, 1, 0)
    assert gray.shape == (1, 16, 16) and gray.dtype == torch.uint8


# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="the refusal is for machines without CUDA")
def test_gpu_decode_is_refused_without_cuda(shards, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", shards, "--decode", "gpu"])
    assert e.value.code == 2 and "--decode gpu" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="nvJPEG on a CUDA device"):
        stream(shards, decode="gpu")
    with pytest.raises(SystemExit):
        parse_args(["--decode", "gpu"])  # digits: nothing to decode
    assert parse_args(["--data", shards]).decode == "cpu"


@requires_cuda
def test_gpu_decode_gives_the_cpu_crops(shards):
    dev = torch.device("cuda")
    gpu = next(iter(stream(shards, decode="gpu", device=dev)))
    cpu = next(iter(stream(shards)))
    assert gpu.shape == cpu.shape and gpu.device.type == "cuda"
    assert ids_of(gpu.cpu()) == ids_of(cpu)  # the same samples, crops and flips
    assert gpu.dtype == cpu.dtype == torch.uint8  # the same uint8 path: the step normalizes either
    # another decoder and resampler: close, not equal (a few grey levels; 0.1 of the normalized scale before)
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 5.0
