"""python -m aimkern.train records the paths aimkern.dispatch chose, and --resume runs the same ones."""
import json
import os

import pytest
import torch

from aimkern import dispatch
from aimkern.dispatch import measure
from aimkern.train import checkpoint as ckpt
from aimkern.train import train

TINY = ["--batch-size", "8", "--log-every", "1", "--no-progress", "--save-every", "0", "--device", "cpu"]


@pytest.fixture
def measured(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMKERN_DISPATCH", "measured")
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.reset()
    yield
    monkeypatch.undo()
    dispatch.reset()


def _count_timing(monkeypatch) -> list:
    timed = []
    real = measure.time_ms

    def counted(spec, cand, problem, **kw):
        timed.append((spec.name, cand.name))
        return real(spec, cand, problem, **kw)

    monkeypatch.setattr(measure, "time_ms", counted)
    return timed


def test_choices_are_recorded_and_reused_on_resume(measured, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    timed = _count_timing(monkeypatch)
    train([*TINY, "--steps", "4", "--stop-at", "2", "--out", str(out)])
    assert timed, "the first run measured its ops"
    with open(out / "run.json") as f:
        recorded = json.load(f)["dispatch"]
    ops = {key.split("|")[0] for key in recorded}
    assert {"attention", "patch_embed", "next_patch_pixel_loss"} <= ops
    state, _ = ckpt.load_latest(str(out))
    assert state["dispatch"] == recorded

    dispatch.reset()  # a new process: nothing decided, and an empty cache folder
    monkeypatch.setenv("AIMKERN_CACHE_DIR", str(tmp_path / "other-cache"))
    timed.clear()
    train([*TINY, "--steps", "4", "--out", str(out), "--resume"])
    assert timed == []  # every call ran its recorded path: verified, not re-timed
    assert {r["problem_key"]: r["chosen"] for r in dispatch.report()} == recorded
    assert all(r["pinned"] for r in dispatch.report())
    assert "dispatch: reusing the" in capsys.readouterr().out


def test_unavailable_recorded_choice_is_reported_in_one_line(measured, tmp_path, capsys):
    out = tmp_path / "run"
    train([*TINY, "--steps", "3", "--stop-at", "1", "--out", str(out)])
    path = ckpt.step_path(str(out), 1)
    state = torch.load(path, weights_only=False)
    key = next(k for k in state["dispatch"] if k.startswith("attention|"))
    state["dispatch"][key] = "flash-attention-4"
    ckpt.save_atomic(state, path)
    dispatch.reset()
    with pytest.warns(dispatch.DispatchWarning) as caught:  # a warning, not a print (a library's message)
        train([*TINY, "--steps", "3", "--out", str(out), "--resume"])
    lines = [str(w.message) for w in caught if "recorded choice" in str(w.message)]
    assert len(lines) == 1 and "'flash-attention-4'" in lines[0] and "measuring instead" in lines[0]
