"""python -m aimkern.train, runs that cannot silently go wrong: resume takes the run's options and refuses
others, extended schedules, finished runs, kept checkpoints with fallback, preemption by SIGTERM, bad images.

Runs are tiny (vit-tiny, a few steps, batch 8) so the file stays fast on a 2-core CPU.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aimkern.train import parse_args, train
from aimkern.train import checkpoint as ckpt
from aimkern.train import resume
from aimkern.train.errors import PREEMPTED_EXIT_CODE, BadDataError, ResumeError
from aimkern.train.schedule import WarmupCosine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--log-every", "1", "--no-progress", "--save-every", "0", "--device", "cpu"]


def run(out, *extra, steps=4):
    summary = train([*TINY, "--steps", str(steps), "--out", str(out), *map(str, extra)])
    return summary, records(out)


def records(out) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def losses(out) -> dict:
    return {step: r["loss"] for step, r in records(out).items()}


# ------------------------------------------------------------------------------------------------------
# options: the run's own, differences refused
def test_resume_takes_the_runs_options_not_the_defaults(tmp_path):
    saved = vars(parse_args(["--batch-size", "8", "--steps", "20", "--lr", "1e-3", "--out", str(tmp_path)]))
    resume.write_options(str(tmp_path), {k: v for k, v in saved.items() if not k.startswith("_")})
    args = parse_args(["--out", str(tmp_path), "--resume"])
    assert (args.batch_size, args.steps, args.lr, args.warmup_steps) == (8, 20, 1e-3, 2)
    longer = parse_args(["--out", str(tmp_path), "--resume", "--steps", "40", "--probe", "--save-every", "5"])
    assert (longer.steps, longer.warmup_steps, longer.probe, longer.save_every) == (40, 2, True, 5)
    assert not parse_args(["--out", str(tmp_path), "--resume"]).probe  # a switch does not stick


def test_bare_resume_keeps_the_runs_cadence_and_bounds(tmp_path):
    """A changeable setting not given again keeps the run's value: no quiet fall-back to the defaults."""
    saved = vars(parse_args(["--save-every", "20", "--log-every", "5", "--keep", "4", "--max-bad-samples", "3",
                             "--out", str(tmp_path)]))
    resume.write_options(str(tmp_path), {k: v for k, v in saved.items() if not k.startswith("_")})
    args = parse_args(["--out", str(tmp_path), "--resume"])
    assert (args.save_every, args.log_every, args.keep, args.max_bad_samples) == (20, 5, 4, 3)
    assert parse_args(["--out", str(tmp_path), "--resume", "--save-every", "50"]).save_every == 50


def test_resume_refuses_options_that_differ_listing_each(tmp_path, capsys):
    resume.write_options(str(tmp_path), {k: v for k, v in vars(parse_args(["--out", str(tmp_path)])).items()
                                         if not k.startswith("_")})
    with pytest.raises(SystemExit) as e:
        parse_args(["--out", str(tmp_path), "--resume", "--batch-size", "16", "--preset", "vit-s16", "--lr", "2e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--batch-size 16 (checkpoint: 64)" in err and "--preset vit-s16 (checkpoint: vit-tiny)" in err
    assert "--lr" not in err  # given, but equal to the run's


def test_extending_steps_replans_the_schedule(tmp_path, capsys):
    run(tmp_path, "--save-every", 2, steps=4)
    capsys.readouterr()
    _, got = run(tmp_path, "--resume", steps=8)
    banner = capsys.readouterr().out
    assert "re-planned for --steps 8 (was 4" in banner
    plan = WarmupCosine(8, 1)
    lrs = {step: got[step]["lr"] for step in range(5, 9)}
    assert lrs == {step: pytest.approx(2e-3 * plan(step - 1)) for step in range(5, 9)}
    assert all(lr > 0 for lr in lrs.values())  # the old total (4) would have left these at 0
    assert f"lr {lrs[5]:.3g} at step 5" in banner
    assert sorted(got) == list(range(1, 9)) and json.load(open(tmp_path / "run.json"))["args"]["steps"] == 8
    with pytest.raises(ResumeError, match="below the step"):
        run(tmp_path, "--resume", steps=6)


def test_finished_run_resumed_only_does_what_was_asked(tmp_path, monkeypatch):
    summary, before = run(tmp_path, steps=3)
    import aimkern.train.loop as loop

    fake_probe = {"probe_pretrained": 0.5, "probe_random_init": 0.25}
    monkeypatch.setattr(loop, "probe", lambda args, env, model_sd, say: fake_probe)
    again, after = run(tmp_path, "--resume", "--probe", steps=3)
    assert after == before  # nothing trained, the metrics untouched
    with open(tmp_path / "summary.json") as f:
        kept = json.load(f)
    assert kept["final_loss"] == summary["final_loss"] is not None and kept["probe_pretrained"] == 0.5
    assert again["final_loss"] == summary["final_loss"]


def test_incompatible_checkpoint_is_a_message(tmp_path):
    run(tmp_path, steps=2)
    os.remove(tmp_path / "run.json")  # a run directory from elsewhere: only the checkpoint speaks
    with pytest.raises(ResumeError, match=r"--img-size 16 \(checkpoint: None\)"):
        run(tmp_path, "--resume", "--img-size", 16, steps=2)
    state = ckpt.load(ckpt.checkpoint_path(tmp_path))
    state["config"]["dim"] = 96  # a checkpoint of another model
    state["args"] = {}
    torch.save(state, ckpt.step_path(tmp_path, 2))
    with pytest.raises(ResumeError, match=r"another model: dim 64 \(checkpoint: 96\)"):
        run(tmp_path, "--resume", steps=2)


def test_cli_resume_errors_are_one_line(tmp_path):
    run(tmp_path, steps=1)
    cmd = [sys.executable, "-m", "aimkern.train", "--out", str(tmp_path), "--resume", "--steps", "1"]
    os.remove(tmp_path / "run.json")
    proc = subprocess.run([*cmd, "--img-size", "16"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m aimkern.train: error: ")


def without_wall_clock(lines: dict) -> dict:
    from aimkern.train.metering import WALL_CLOCK

    return {step: {k: v for k, v in r.items() if k not in WALL_CLOCK} for step, r in lines.items()}


def test_resumed_log_lines_equal_the_uninterrupted_runs(tmp_path):
    """Every metrics.jsonl line of a run stopped between log steps and resumed equals the uninterrupted run's
    line, wall-clock fields aside: the checkpoint carries the open loss window (steps 4 and 5 here)."""
    cadence = ["--log-every", 3, "--save-every", 2]
    _, straight = run(tmp_path / "straight", *cadence, steps=9)
    assert sorted(straight) == [3, 6, 9]
    _, stopped = run(tmp_path / "resumed", *cadence, "--stop-at", 5, steps=9)
    assert sorted(stopped) == [3]  # a stop writes no line of its own
    _, resumed = run(tmp_path / "resumed", *cadence, "--resume", steps=9)
    assert without_wall_clock(resumed) == without_wall_clock(straight)
    assert resumed[6]["loss"] == straight[6]["loss"]  # bit for bit, though steps 4-5 ran in another process
    assert set(straight[6]) - set(without_wall_clock(straight)[6]) == {"img_per_s", "elapsed_s"}


# ------------------------------------------------------------------------------------------------------
# checkpoints: the last --keep, fallback on a corrupt latest
def test_keeps_the_last_checkpoints_and_falls_back_on_a_corrupt_one(tmp_path, capsys):
    _, straight = run(tmp_path / "straight", steps=6)
    out = tmp_path / "run"
    run(out, "--save-every", 2, "--stop-at", 6, steps=6)
    assert [s for s, _ in ckpt.step_files(out)] == [4, 6]  # --keep 2
    assert os.path.samefile(ckpt.checkpoint_path(out), ckpt.step_path(out, 6))
    with open(ckpt.step_path(out, 6), "r+b") as f:  # a copy cut short
        f.truncate(1000)
    capsys.readouterr()
    _, got = run(out, "--resume", "--keep", 3, steps=6)
    text = capsys.readouterr().out
    assert f"checkpoint {ckpt.step_path(out, 6)} is unreadable" in text and "falling back" in text
    assert "resuming from" in text and "at step 4" in text
    assert losses(out) == {s: r["loss"] for s, r in straight.items()}
    assert [s for s, _ in ckpt.step_files(out)] == [4, 6] and ckpt.load(ckpt.checkpoint_path(out))["step"] == 6
    for _, path in ckpt.step_files(out):
        with open(path, "r+b") as f:
            f.truncate(10)
    with pytest.raises(ResumeError, match="no readable checkpoint"):
        run(out, "--resume", steps=6)


# ------------------------------------------------------------------------------------------------------
# preemption
def test_sigterm_saves_and_resume_equals_the_uninterrupted_run(tmp_path):
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "aimkern.train", *TINY, "--save-every", "2", "--steps", "400", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.step_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None or not ckpt.step_files(out):
            pytest.fail(f"no checkpoint before the run ended: {proc.communicate()[0][-2000:]}")
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, text[-2000:]
    assert "SIGTERM received" in text and "Traceback" not in text
    stopped = ckpt.load(ckpt.checkpoint_path(out))["step"]
    assert 2 <= stopped < 400 and max(losses(out)) == stopped
    _, resumed = run(out, "--resume", "--stop-at", stopped + 2, steps=400)
    _, straight = run(tmp_path / "straight", "--stop-at", stopped + 2, steps=400)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in straight.items()}  # bit for bit


def test_sigusr1_in_process_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    import aimkern.train.step as step_module

    real = step_module.step_prefix

    def prefix_then_signal(run, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step: the step still finishes
        return real(run, step)

    monkeypatch.setattr(step_module, "step_prefix", prefix_then_signal)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, steps=5)
    assert e.value.code == PREEMPTED_EXIT_CODE and ckpt.load(ckpt.checkpoint_path(tmp_path))["step"] == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run
    summary, _ = run(tmp_path / "last", steps=2)  # a signal in the last step: the run just finishes
    assert summary["steps"] == 2 and summary["final_loss"] is not None


# ------------------------------------------------------------------------------------------------------
# bad samples
@pytest.fixture
def folder_with_a_corrupt_image(tmp_path):
    pytest.importorskip("torchvision")  # --data DIR reads with torchvision (not a hard dependency)
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(4):
            pixels = (torch.rand(36, 36, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not an image at all")
    return root


def test_corrupt_image_is_skipped_counted_and_resume_stays_exact(tmp_path, folder_with_a_corrupt_image, capsys):
    data = ["--data", folder_with_a_corrupt_image, "--workers", 0, "--max-bad-samples", 1]
    summary, straight = run(tmp_path / "straight", *data, steps=3)
    broken = str(folder_with_a_corrupt_image / "b" / "broken.png")
    (record,) = summary["bad_files"]  # one record type: sample, error class, message
    assert record["sample"] == broken and record["error"] == "UnidentifiedImageError" and "broken.png" in record["message"]
    assert summary["bad_samples"] >= 1
    assert straight[3]["bad_samples"] == summary["bad_samples"] and straight[3]["bad_files"] == 1
    assert [r for line in straight.values() for r in line["new_bad"]] == [record]  # listed once, when first met
    err = capsys.readouterr().err
    assert f"skipped bad sample {broken} at step" in err and "UnidentifiedImageError" in err
    run(tmp_path / "resumed", *data, "--stop-at", 1, steps=3)
    resumed_summary, resumed = run(tmp_path / "resumed", *data, "--resume", steps=3)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in straight.items()}
    assert resumed[3]["bad_samples"] == straight[3]["bad_samples"]


def test_mostly_broken_data_stops_the_run(tmp_path, folder_with_a_corrupt_image, capsys):
    with pytest.raises(BadDataError, match="1 of 9 samples are unreadable.*--max-bad-samples 0.001") as stop:
        run(tmp_path, "--data", folder_with_a_corrupt_image, "--workers", 0, steps=3)  # default: 1 in 1000
    # The work is kept: a checkpoint at the stop, from which a raised bound continues (not a restart).
    (stopped_at,) = [s for s, _ in ckpt.step_files(tmp_path)]
    assert "checkpoint" in str(stop.value) and stopped_at < 3
    capsys.readouterr()
    _, resumed = run(tmp_path, "--data", folder_with_a_corrupt_image, "--workers", 0, "--resume",
                     "--max-bad-samples", 1, steps=3)
    assert f"at step {stopped_at}" in capsys.readouterr().out  # resumed, not restarted
    assert ckpt.load(ckpt.checkpoint_path(tmp_path))["step"] == 3
    _, straight = run(tmp_path / "straight", "--data", folder_with_a_corrupt_image, "--workers", 0,
                      "--max-bad-samples", 1, steps=3)
    assert without_wall_clock(resumed) == without_wall_clock(straight)  # the stop's own line was written


def test_fallback_sets_the_unreadable_checkpoint_aside(tmp_path, capsys):
    """Resumed past a corrupt latest checkpoint with a longer --steps, the run saves only beyond it: the
    corrupt file must not take a --keep slot and push out the checkpoint the run resumed from."""
    out = tmp_path / "run"
    run(out, "--save-every", 2, "--stop-at", 6, steps=6)
    with open(ckpt.step_path(out, 6), "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    run(out, "--resume", "--steps", 8, "--save-every", 0)  # resumes at 4, saves only at 8
    assert f"kept the unreadable checkpoint as {ckpt.step_path(out, 6)}.unreadable" in capsys.readouterr().out
    assert [s for s, _ in ckpt.step_files(out)] == [4, 8]  # without the rename: [6 (unreadable), 8]
    assert os.path.isfile(f"{ckpt.step_path(out, 6)}.unreadable")


def test_bad_sample_state_round_trips_and_reads_the_old_format():
    from aimkern.data.bad import BadRecord
    from aimkern.distributed import DistEnv
    from aimkern.train.bad_samples import BadSamples

    bad, said = BadSamples(5, 100), []
    cut = BadRecord("a.jpg", "OSError", "cut")
    bad.add([cut, cut, BadRecord("b.png", "E", "m")])  # a.jpg read twice
    bad.sync(DistEnv(), said.append, step=7)
    assert bad.reads == 3 and len(said) == 2 and "a.jpg at step 7: OSError: cut" in said[0]
    assert bad.since(6) == [{"sample": "a.jpg", "error": "OSError", "message": "cut"},
                            {"sample": "b.png", "error": "E", "message": "m"}] and bad.since(7) == []
    again = BadSamples(5, 100)
    again.load_state_dict(bad.state_dict())
    assert again.records() == bad.records() and again.reads == 3 and again.since(6) == bad.since(6)
    old = BadSamples(5, 100)  # a checkpoint written before BadRecord: {path: "Error: message"}
    old.load_state_dict({"paths": {"c.jpg": "UnidentifiedImageError: cannot identify"}, "reads": 2})
    assert old.records() == [{"sample": "c.jpg", "error": "UnidentifiedImageError", "message": "cannot identify"}]
    bounded = BadSamples(1, 100)  # at most 1 bad sample, 2 met
    bounded.load_state_dict(bad.state_dict())
    with pytest.raises(BadDataError, match="2 of 100 samples are unreadable by step 9"):
        bounded.check(9)
    bad.check(9)  # within its bound of 5
