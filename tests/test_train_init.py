"""python -m aimkern.train --init CKPT: a new run from another checkpoint's trunk (any layout), fresh head and
optimizer; --init with --resume refused; run.json records the source and its checksum."""
import hashlib
import json
import os

import pytest
import torch

from aimkern import CausalViT
from aimkern.train import train

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "apple")
TINY = ["--batch-size", "8", "--log-every", "1", "--no-progress", "--save-every", "0", "--device", "cpu"]


def source(tmp_path, layout: str) -> tuple:
    torch.manual_seed(123)
    model = CausalViT.from_preset("vit-tiny")
    path = model.save_checkpoint(str(tmp_path / f"src-{layout}.pth"), layout=layout)
    return model, path


def trunk(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def run_json(out) -> dict:
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)["args"]


@pytest.mark.parametrize("layout,preset", [("timm", ["--preset", "vit-tiny"]), ("aimkern", [])])
def test_init_loads_the_trunk_and_starts_fresh(tmp_path, layout, preset, capsys):
    src, path = source(tmp_path, layout)
    out = tmp_path / "run"
    train([*TINY, "--steps", "1", "--lr", "1e-9", "--init", path, *preset, "--out", str(out)])
    saved = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    for k, v in trunk(src.state_dict()).items():  # one step at lr 1e-9: still the source's trunk
        torch.testing.assert_close(saved["model"][k], v, atol=1e-6, rtol=0, msg=k)
    assert not torch.allclose(saved["model"]["head.out.weight"], src.state_dict()["head.out.weight"])  # fresh head
    assert saved["step"] == 1
    args = run_json(out)
    assert args["init"] == path and args["preset"] == "vit-tiny"
    assert args["init_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert f"--init {path} ({layout} layout" in capsys.readouterr().out


def test_without_init_the_trunk_is_a_new_init(tmp_path):
    src, _ = source(tmp_path, "timm")
    out = tmp_path / "plain"
    train([*TINY, "--steps", "1", "--lr", "1e-9", "--seed", "5", "--out", str(out)])
    saved = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert not torch.allclose(saved["model"]["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])
    assert run_json(out)["init"] is None


def test_resume_of_an_init_run_continues_it_and_keeps_the_record(tmp_path):
    _, path = source(tmp_path, "aimkern")
    out, full = tmp_path / "r", tmp_path / "full"
    train([*TINY, "--steps", "3", "--init", path, "--out", str(full)])
    train([*TINY, "--steps", "3", "--init", path, "--out", str(out), "--stop-at", "1"])
    train([*TINY, "--resume", "--out", str(out)])
    a = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    b = torch.load(os.path.join(full, "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert run_json(out)["init"] == path


def test_init_with_resume_is_refused(tmp_path, capsys):
    _, path = source(tmp_path, "timm")
    with pytest.raises(SystemExit):
        train([*TINY, "--init", path, "--resume", "--out", str(tmp_path / "x")])
    assert "--init starts a new run" in capsys.readouterr().err


def test_init_that_fits_no_preset_is_refused(tmp_path, capsys):
    path = str(tmp_path / "v2.pth")
    torch.save(torch.load(os.path.join(FIX, "ml_aim_v2.pt"), weights_only=True)["state_dict"], path)
    with pytest.raises(SystemExit):  # 4 heads of 16: no released width tells them (never guessed)
        train([*TINY, "--init", path, "--out", str(tmp_path / "x")])
    assert "pass num_heads= (the source model's head count) or preset=" in capsys.readouterr().err
    other = CausalViT.from_preset("vit-tiny", depth=2).save_checkpoint(str(tmp_path / "d2.pth"))  # config stored
    with pytest.raises(SystemExit):
        train([*TINY, "--init", other, "--out", str(tmp_path / "w")])
    assert "matches no preset: give --preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not fit a CausalViT"):
        train([*TINY, "--steps", "1", "--init", path, "--preset", "vit-tiny", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):
        train([*TINY, "--init", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "z")])
