"""python -m aimkern.eval: probes beat the random init, attentive >= linear, the cache changes nothing, 2 gloo
processes extract what 1 does, the torch linear probe matches scikit-learn's, k-NN as DINO, clear errors.

One tiny pretraining run (vit-tiny at 16 px, N = 16, 150 steps of 32: ~15 s) is shared by the module; every
evaluation runs on the CPU on the bundled digits (nothing is downloaded).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from aimkern.eval import build_parser, evaluate
from aimkern.eval.features import resolve_layers
from aimkern.eval.probes import AttentivePoolingHead, KnnConfig, LinearConfig, knn_probe, train_linear
from aimkern.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--no-progress", "--device", "cpu"]
FAST_ATTN = ["--attn-epochs", "5"]  # enough to exercise the attentive probe where its accuracy is not the point


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    train(["--img-size", "16", "--batch-size", "32", "--steps", "150", "--save-every", "0", "--no-progress",
           "--device", "cpu", "--out", str(out)])
    return str(out)


def ev(model, out, *extra):
    return evaluate([str(model), "--out", str(out), *QUIET, *map(str, extra)])


def _top1(report, tag, probe):
    return report["results"][tag][probe]["top1"]


# ------------------------------------------------------------------------------------------------------
def test_help_documents_every_option():
    text = build_parser().format_help()
    for flag in ("MODEL", "--preset", "--train", "--val", "--layers", "--cache-dir", "--no-cache", "--probes",
                 "--feature-dtype", "--attn-epochs", "--attn-lr", "--linear-lr", "--knn-k", "--knn-temperature",
                 "--seed", "--out", "--no-baseline", "--weights", "--timm-kwargs"):
        assert flag in text, flag


def test_console_entry_point_runs_help():
    from aimkern.eval.__main__ import main  # setup.py's aimkern-eval=aimkern.eval.__main__:main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_layers_option():
    assert resolve_layers(None, 4) == (3,) and resolve_layers(None, 24) == tuple(range(18, 24))  # AIM: last 6/24
    assert resolve_layers("last:2", 4) == (2, 3) and resolve_layers("-1,0", 4) == (0, 3)
    assert resolve_layers("final", 4) == "final"
    for bad in ("last:9", "4", "x", "last:0"):
        with pytest.raises(ValueError, match="--layers"):
            resolve_layers(bad, 4)


# ------------------------------------------------------------------------------------------------------
def test_probes_beat_random_init_and_attentive_matches_linear(run_dir, tmp_path, capsys):
    """The defaults (every probe, with the baseline) on the pretrained vit-tiny: each probe beats itself on the
    random init, AIM's attentive probe matches or beats the linear one, and OUT/eval.json holds the table's
    numbers."""
    report = ev(run_dir, tmp_path)
    for probe in ("attentive", "linear", "knn"):
        pre, rnd = _top1(report, "model", probe), _top1(report, "random init", probe)
        assert pre > rnd + 0.03, (probe, pre, rnd)  # attentive: ~0.92 vs 0.86, the smallest gap
        assert 0.2 < rnd and pre < 1.0  # ten classes: a broken probe sits near 0.1
        assert report["results"]["model"][probe]["top5"] >= pre
    assert _top1(report, "model", "attentive") >= _top1(report, "model", "linear")
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["results"] == report["results"]
    table = capsys.readouterr().out
    assert "attentive" in table and "random init" in table and f"{100 * _top1(report, 'model', 'knn'):.2f}" in table


def test_cache_gives_identical_results_and_is_reused(run_dir, tmp_path, capsys):
    """Fixed seeds: the first run (extract + write), a rerun (read the memory-mapped cache) and a --no-cache
    run give the very same numbers."""
    args = ["--no-baseline", *FAST_ATTN, "--cache-dir", tmp_path / "cache"]
    first = ev(run_dir, tmp_path / "a", *args)
    assert "cached features" not in capsys.readouterr().out
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 2 and not [e for e in entries if e.endswith(".tmp")]  # train and val, complete
    again = ev(run_dir, tmp_path / "b", *args)
    assert capsys.readouterr().out.count("cached features") == 2
    uncached = ev(run_dir, tmp_path / "c", "--no-cache", *args)
    strip = {p: {k: v for k, v in r.items() if k != "seconds"} for p, r in first["results"]["model"].items()}
    for other in (again, uncached):
        assert {p: {k: v for k, v in r.items() if k != "seconds"}
                for p, r in other["results"]["model"].items()} == strip
    other_layers = ev(run_dir, tmp_path / "d", *args, "--layers", "final", "--probes", "knn")
    assert len(os.listdir(tmp_path / "cache")) == 4  # other layers: other entries, not a stale hit
    assert other_layers["layers"] == "final"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_extraction_equals_one(run_dir, tmp_path):
    """torchrun, 2 gloo processes: the ranks split the batches and fill one shared memory-mapped entry that is
    bit-identical to the 1-process entry; the probes (rank 0) give the same numbers."""
    common = ["--probes", "knn", "--no-baseline", "--batch-size", "100", *QUIET]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "aimkern.eval", run_dir,
           "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "c2"), *common]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = evaluate([run_dir, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1"), *common])
    assert sorted(os.listdir(tmp_path / "c1")) == sorted(os.listdir(tmp_path / "c2"))  # same keys
    for entry in os.listdir(tmp_path / "c1"):
        for name in ("patches", "pooled", "labels"):
            a = np.load(tmp_path / "c1" / entry / f"{name}.npy")
            b = np.load(tmp_path / "c2" / entry / f"{name}.npy")
            assert a.shape == b.shape and np.array_equal(a, b), (entry, name)
    with open(tmp_path / "two" / "eval.json") as f:
        assert json.load(f)["results"]["model"]["knn"]["top1"] == one["results"]["model"]["knn"]["top1"]


# ------------------------------------------------------------------------------------------------------
def test_linear_probe_matches_scikit_learn():
    """The torch linear probe (mini-batch AdamW) against scikit-learn's logistic regression, the small-data
    reference, on separable-but-noisy synthetic features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 32)) * 0.6
    y = rng.integers(0, 6, size=900)
    x = (centers[y] + rng.normal(size=(900, 32))).astype(np.float32)
    xt, yt, xv, yv = x[:600], y[:600], x[600:], y[600:]
    scaler = StandardScaler().fit(xt)
    ref = LogisticRegression(max_iter=3000).fit(scaler.transform(xt), yt).score(scaler.transform(xv), yv)
    got = train_linear(xt, yt, xv, yv, num_classes=6, cfg=LinearConfig(epochs=50), device=torch.device("cpu"),
                       seed=0)
    assert 0.5 < ref < 0.98  # a task where the solvers can differ, and not trivially
    assert abs(got["top1"] - ref) <= 0.03, (got, ref)
    assert got["top5"] >= got["top1"]


def test_knn_is_dinos_weighted_vote():
    """Brute-force DINO k-NN in NumPy (cosine, top-k, exp(sim / T) votes) gives the same predictions."""
    rng = np.random.default_rng(1)
    xt, xv = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    yt, yv = rng.integers(0, 7, 200), rng.integers(0, 7, 50)
    got = knn_probe(xt, yt, xv, yv, num_classes=7, cfg=KnnConfig(k=20, temperature=0.07, chunk=16),
                    device=torch.device("cpu"))
    nt, nv = xt / np.linalg.norm(xt, axis=1, keepdims=True), xv / np.linalg.norm(xv, axis=1, keepdims=True)
    sim = nv @ nt.T
    votes = np.zeros((50, 7))
    for i in range(50):
        top = np.argsort(-sim[i])[:20]
        np.add.at(votes[i], yt[top], np.exp(sim[i, top] / 0.07))
    assert got["top1"] == pytest.approx(float((votes.argmax(1) == yv).mean()))


def test_attentive_head_is_aims():
    head = AttentivePoolingHead(dim=64, num_classes=10, num_heads=4, num_queries=2)
    assert not head.bn.affine and head.k.bias is None and head.v.bias is None  # BN without affine; no qkv bias
    assert head.query.shape == (1, 2, 64)
    assert head(torch.randn(3, 16, 64)).shape == (3, 10)


def test_timm_model_with_local_weights(tmp_path):
    """timm:NAME through CausalViT.from_timm, weights from a local file (nothing downloaded)."""
    timm = pytest.importorskip("timm")
    kwargs = {"class_token": False, "global_pool": "avg", "img_size": 16, "patch_size": 4, "embed_dim": 64,
              "depth": 1, "num_heads": 4}
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs).state_dict(),
               tmp_path / "w.pt")
    report = ev("timm:vit_tiny_patch16_224", tmp_path / "o", "--weights", tmp_path / "w.pt", "--timm-kwargs",
                json.dumps(kwargs), "--probes", "knn", "--no-baseline")
    assert report["name"] == "timm:vit_tiny_patch16_224" and report["config"]["dim"] == 64
    assert report["results"]["model"]["knn"]["top1"] > 0.2


# ------------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_preset_is_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="not --preset vit-s16"):
        ev(run_dir, tmp_path, "--preset", "vit-s16")


def test_plain_state_dict_of_another_preset_is_refused(run_dir, tmp_path):
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="shapes do not fit"):
        ev(tmp_path / "weights.pt", tmp_path / "o", "--preset", "vit-tiny")  # 16 px weights, 32 px preset


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without checkpoint.pt"):
        ev(tmp_path, tmp_path / "o")


def _folder(root, classes, per_class=3, size=20):
    from PIL import Image

    gen = torch.Generator().manual_seed(len(classes))
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size + 4, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folders_map_val_classes_by_name(tmp_path):
    pytest.importorskip("torchvision")
    _folder(tmp_path / "train", ["ant", "bee", "cat"])
    _folder(tmp_path / "val", ["bee", "cat"], per_class=2)  # val may lack a train class
    report = ev("vit-tiny", tmp_path / "o", "--train", tmp_path / "train", "--val", tmp_path / "val",
                "--probes", "knn,linear", "--workers", "0", "--linear-epochs", "2")
    assert report["classes"] == 3 and report["train_size"] == 9 and report["val_size"] == 4
    assert "random init" not in report["results"]  # a preset is its own random-init baseline
    assert report["results"]["model"]["knn"]["top5"] is None  # 3 classes: top-5 would be trivially 1
    from aimkern.eval.data import image_folders

    assert image_folders(tmp_path / "train", tmp_path / "val", 32, 3).val.labels.tolist() == [1, 1, 2, 2]


def test_val_classes_not_in_train_are_refused(tmp_path):
    pytest.importorskip("torchvision")
    _folder(tmp_path / "train", ["ant", "bee"], per_class=1)
    _folder(tmp_path / "val", ["bee", "cow"], per_class=1)
    with pytest.raises(ValueError, match=r"--val has 1 class\(es\) that --train lacks \(cow\)"):
        ev("vit-tiny", tmp_path / "o", "--train", tmp_path / "train", "--val", tmp_path / "val")


def test_empty_folders_are_refused(tmp_path):
    pytest.importorskip("torchvision")
    os.makedirs(tmp_path / "empty")
    _folder(tmp_path / "val", ["a"], per_class=1)
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ev("vit-tiny", tmp_path / "o", "--train", tmp_path / "empty", "--val", tmp_path / "val")
    os.makedirs(tmp_path / "hollow" / "a")  # a class folder without images
    with pytest.raises(ValueError, match="--train .*hollow"):
        ev("vit-tiny", tmp_path / "o", "--train", tmp_path / "hollow", "--val", tmp_path / "val")
