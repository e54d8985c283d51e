"""python -m aimkern.eval MODEL --native (issue 29, item 4): per-image features at native resolution.

An image's native feature is the patch mean of its own rows of the packed trunk: for a square image at the
config's size it equals the square path's pooled feature; the command runs the linear and k-NN probes on
trees of mixed-size images and refuses what it cannot do.
"""
import json
import os

import pytest
import torch

from aimkern import CausalViT
from aimkern.eval import evaluate, parse_args
from aimkern.eval.features import layer_features
from aimkern.eval.native import packed_layer_features

pytest.importorskip("torchvision")


def tree(root, sizes, seed):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for i, (w, h) in enumerate(sizes):
        cls = root / "ab"[i % 2]
        os.makedirs(cls, exist_ok=True)
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(cls / f"{i}.png")
    return root


@pytest.mark.parametrize("layers", [(0, 1), "final"])
def test_square_native_features_equal_the_square_paths(layers):
    torch.manual_seed(0)
    m = CausalViT.from_preset("vit-tiny", img_size=16, depth=2, backend="reference").eval()
    g = torch.Generator().manual_seed(1)
    square = [torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(2)]
    other = torch.randint(0, 256, (3, 8, 28), generator=g, dtype=torch.uint8)
    got = packed_layer_features(m, [square[0], other, square[1]], layers, torch.device("cpu"))
    from aimkern.data.inputs import model_input

    want = layer_features(m, model_input(torch.stack(square), 3), layers).mean(dim=1)
    torch.testing.assert_close(got[[0, 2]], want, rtol=1e-5, atol=1e-5)
    alone = packed_layer_features(m, [other], layers, torch.device("cpu"))
    torch.testing.assert_close(got[1], alone[0], rtol=1e-5, atol=1e-5)


def test_native_eval_runs_the_pooled_probes_on_mixed_sizes(tmp_path):
    sizes = [(48, 36), (36, 48), (40, 40), (64, 36), (30, 22), (80, 60), (20, 60), (12, 12)]
    train = tree(tmp_path / "train", sizes, 0)
    val = tree(tmp_path / "val", sizes[:4], 1)
    report = evaluate(["vit-tiny", "--img-size", "16", "--native", "--max-patches", "12", "--train", str(train),
                       "--val", str(val), "--probes", "linear,knn", "--linear-epochs", "2", "--no-baseline",
                       "--workers", "0", "--device", "cpu", "--batch-size", "3", "--no-progress",
                       "--backend", "reference", "--out", str(tmp_path / "out")])
    assert report["native_max_patches"] == 12 and set(report["results"]["model"]) == {"linear", "knn"}
    with open(tmp_path / "out" / "eval.json") as f:
        assert json.load(f)["native_max_patches"] == 12


def test_native_eval_refuses_what_it_cannot_do(tmp_path, capsys):
    for argv, message in ((["--native"], "--native reads ImageFolder trees"),
                          (["--native", "--train", "t", "--val", "v"], "attentive probe"),
                          (["--max-patches", "4"], "--max-patches needs --native")):
        with pytest.raises(SystemExit):
            parse_args(["vit-tiny", *argv])
        assert message in capsys.readouterr().err
