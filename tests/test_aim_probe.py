"""Apple's released AIM attention-probe head: loading it, ml-aim's probe semantics, the eval command."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch

from aimkern import CausalViT, ViTConfig
from aimkern.eval.aim_probe import (CLIP_MEAN_STD, IMAGENET_MEAN_STD, aim_eval_transform, classify,
                                    load_aim_probe_head, mean_std_for, probe_layers)
from aimkern.eval.features import layer_features

FX = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "apple", "ml_aim_v1.pt"), weights_only=True)


def backbone() -> CausalViT:
    return CausalViT.from_checkpoint(FX["backbone"], num_heads=4, img_size=28, head_depth=0, verbose=False).eval()


def test_released_head_reproduces_apples_classifier():
    model = backbone()
    torch.testing.assert_close(layer_features(model, FX["images"], (0, 1)), FX["probe_input"], atol=2e-5, rtol=0)
    head = load_aim_probe_head(FX["head"], num_heads=4)
    assert head.bn.running_var.shape == (64,) and not head.bn.affine
    torch.testing.assert_close(classify(model, head, FX["images"], FX["probe_layers"]), FX["logits"],
                               atol=2e-5, rtol=0)


def test_head_file_with_or_without_prefix(tmp_path):
    path = str(tmp_path / "head.pth")
    torch.save({k[len("head."):]: v for k, v in FX["head"].items()}, path)
    head = load_aim_probe_head(path, num_heads=4)
    assert torch.equal(head.query.detach(), FX["head"]["head.cls_token"])
    assert torch.equal(head.linear.bias.detach(), torch.zeros(10))  # released without a bias


@pytest.mark.parametrize("edit,match", [
    (lambda s: {**s, "head.extra": torch.zeros(1)}, "unknown keys"),
    (lambda s: {k: v for k, v in s.items() if k != "head.k.weight"}, "missing"),
    (lambda s: {**s, "head.cls_token": torch.zeros(1, 2, 64)}, "one query"),
])
def test_bad_heads_are_refused(edit, match):
    with pytest.raises(ValueError, match=match):
        load_aim_probe_head(edit(dict(FX["head"])), num_heads=4)


def test_probe_layers_follow_ml_aim():
    def fake(preset, **kw):
        return types.SimpleNamespace(config=ViTConfig.from_preset(preset, **kw))

    assert probe_layers("best", fake("aim-600m")) == (14, 15, 16, 17, 18, 19)
    assert probe_layers("best", fake("aim-7b")) == (14, 15, 16, 17, 18, 19)
    assert probe_layers("last", fake("aim-1b")) == tuple(range(18, 24))
    assert probe_layers("3,1", fake("aim-1b")) == (1, 3)
    with pytest.raises(ValueError, match="best layers"):
        probe_layers("best", fake("vit-tiny"))
    with pytest.raises(ValueError, match="block indices"):
        probe_layers("30", fake("vit-tiny"))
    assert mean_std_for(fake("aim-600m")) == IMAGENET_MEAN_STD and mean_std_for(fake("aimv2-large")) == CLIP_MEAN_STD


def test_eval_transform_is_ml_aims():
    from PIL import Image
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    got = aim_eval_transform(100, CLIP_MEAN_STD)(im)
    size = math.ceil(100 / 0.875)  # 115: ml-aim rounds up
    want = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(100), T.ToTensor(),
                      T.Normalize(*CLIP_MEAN_STD)])(im)
    assert got.shape == (3, 100, 100) and torch.equal(got, want)


def _files(tmp_path):
    bb, hd = str(tmp_path / "backbone.pth"), str(tmp_path / "head.pth")
    torch.save(FX["backbone"], bb)
    torch.save(FX["head"], hd)
    return ["--init", bb, "--head", hd, "--img-size", "28", "--num-heads", "4", "--probe-layers", "last"]


def test_eval_command_on_digits(tmp_path, capsys):
    from aimkern.eval.__main__ import main

    out = str(tmp_path / "r.json")
    main(_files(tmp_path) + ["--data", "digits", "--out", out, "--device", "cpu"])
    report = json.load(open(out))
    assert report["n"] == 450 and 0 <= report["top1"] <= report["top5"] <= 100 and report["layers"] == [0, 1]
    assert "released AIM probe" in capsys.readouterr().out


def test_eval_command_on_an_image_folder(tmp_path):
    from PIL import Image

    from aimkern.eval.aim_probe import main

    rng = np.random.default_rng(1)
    for c in ("n01", "n02"):
        os.makedirs(tmp_path / "val" / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    report = main(_files(tmp_path) + ["--data", str(tmp_path / "val"), "--workers", "0", "--device", "cpu"])
    assert report["n"] == 6
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        main(_files(tmp_path) + ["--data", str(tmp_path / "nope")])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_probes_of_a_released_layout_backbone(tmp_path, suffix):
    """python -m aimkern.eval MODEL with MODEL in Apple's layout: read by from_checkpoint, config inferred."""
    from aimkern.checkpoints import write_file
    from aimkern.eval import evaluate

    fx = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "apple", "ml_aim_v2.pt"), weights_only=True)
    path = str(tmp_path / f"aimv2{suffix}")
    write_file(fx["state_dict"], path)
    args = [path, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu", "--probes", "knn", "--no-baseline"]
    with pytest.raises(ValueError, match="num_heads="):  # 4 heads of 16: no released width tells them
        evaluate(args)
    report = evaluate(args + ["--num-heads", "4"])
    assert report["config"]["dim"] == 64 and report["config"]["norm"] == "rmsnorm"
    assert report["config"]["num_heads"] == 4
    assert 0 < report["results"]["model"]["knn"]["top1"] <= 1
