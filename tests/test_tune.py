"""python -m aimkern.tune on the CPU: every op call of one training step decided, shown and written."""
import json

import pytest

from aimkern import dispatch
from aimkern.tune import main, speedup


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIMKERN_DISPATCH", "fixed")  # tune measures anyway
    dispatch.reset()
    yield tmp_path
    monkeypatch.undo()
    dispatch.reset()


def test_tune_decides_one_training_step(cache, capsys):
    out = cache / "tune.json"
    assert main(["--preset", "vit-tiny", "--device", "cpu", "--batch-size", "4", "--json", str(out),
                 "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| op | problem | candidates" in text and "| attention | 4x4x64x16 float32 prefix-causal fwd+bwd |" in text
    data = json.loads(out.read_text())
    ops = {r["op"] for r in data["rows"]}
    assert ops == {"patch_embed", "attention", "next_patch_pixel_loss"}
    for row in data["rows"]:
        assert row["candidates"][row["chosen"]]["verified"] and row["from_cache"] is False
        assert row["speedup_vs_torch"] == pytest.approx(speedup(row))
        assert row["speedup_vs_torch"] >= 1.0  # on CPU every candidate is PyTorch's: the best one wins
        assert f"chosen {row['chosen']}" in text
    assert "runs on cuda, not cpu" in text and "fwd+bwd" in text

    dispatch.reset()
    assert main(["--preset", "vit-tiny", "--device", "cpu", "--batch-size", "4", "--json", str(out)]) == 0
    assert all(r["from_cache"] for r in json.loads(out.read_text())["rows"])
    assert "(cached)" in capsys.readouterr().out


def test_tune_token_head_decides_the_cross_entropy(cache):
    out = cache / "tune.json"
    main(["--preset", "vit-tiny", "--device", "cpu", "--batch-size", "2", "--objective", "token", "--json", str(out)])
    rows = {r["op"]: r for r in json.loads(out.read_text())["rows"]}
    assert "linear_cross_entropy" in rows and "next_patch_pixel_loss" not in rows
    assert rows["linear_cross_entropy"]["chosen"] in ("chunked", "torch-fused", "reference")


def test_tune_png(cache):
    pytest.importorskip("matplotlib")
    png = cache / "tune.png"
    main(["--preset", "vit-tiny", "--device", "cpu", "--batch-size", "2", "--png", str(png)])
    assert png.stat().st_size > 1000


def test_tune_refuses_bad_options(cache):
    with pytest.raises(SystemExit, match="unknown preset 'vit-q'"):
        main(["--preset", "vit-q", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        main(["--preset", "vit-tiny", "--device", "cpu", "--batch-size", "0"])
