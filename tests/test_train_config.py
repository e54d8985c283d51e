"""aimkern.train.TrainConfig is the one place of the trainer's options: the parser, run.json, --help's and the
README's list of what --resume may change are generated from its fields; the resume rules are pinned; the
facts the trainer shares with the rest of the package (backend names, preset overrides) have one source;
the token objective reads the model's geometry without building the model; the progress bar stays out of a
log file.
"""
import ast
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import aimkern.backends
from aimkern.train import TrainConfig, build_parser, parse_args
from aimkern.train import config, resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _actions() -> dict:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


# ------------------------------------------------------------------------------------------------------
# generated from the fields
def test_the_parser_is_the_fields():
    """Every command-line field is one flag with the field's default, help and type; nothing else is."""
    actions = _actions()
    cli = [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]
    assert list(actions) == [f.name for f in cli]  # same options, same (--help's) order
    for f in cli:
        action = actions[f.name]
        assert action.option_strings == [config.flag(f.name)]
        assert (action.default, action.help) == (f.default, f.metadata["help"]), f.name
        assert action.type is f.metadata["type"] and action.choices == f.metadata["choices"], f.name
        assert f.metadata["resume"] in config.RULES
    assert [name for name in FIELDS if name not in actions] == ["init_sha256"]  # set by parse_args only


def test_parse_args_returns_a_train_config_and_run_json_records_every_field():
    args = parse_args(["--batch-size", "8", "--steps", "7"])
    assert isinstance(args, TrainConfig) and (args.batch_size, args.steps, args.warmup_steps) == (8, 7, 1)
    assert config.run_options(args) == dataclasses.asdict(args)  # every field, in field order, nothing else
    assert list(config.run_options(args)) == FIELDS


def test_resume_rules_are_pinned():
    """The rule of every option, as the trainer has always applied them (a changed rule changes what
    --resume refuses or keeps: it must be deliberate, here)."""
    assert set(config.options(config.KEPT)) == {
        "steps", "save_every", "log_every", "keep", "max_bad_samples", "workers", "threads", "device", "backend",
        "compile_backend"}
    assert set(config.options(config.PER_INVOCATION)) == {
        "stop_at", "probe", "no_progress", "compile", "checkpointing", "fsdp", "resume", "out"}
    assert set(config.options(config.REFUSED)) == {
        "preset", "data", "decode", "img_size", "objective", "tokenizer", "vocab_size", "tokenizer_images",
        "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "seed", "precision", "init",
        "init_sha256", "native", "max_patches", "tokens_per_batch"}
    assert set(resume.CHANGEABLE) == set(config.options(config.KEPT, config.PER_INVOCATION))
    assert set(resume.KEPT_WHEN_ABSENT) == set(config.options(config.KEPT))


def test_help_lists_what_resume_may_change():
    text = " ".join(build_parser().format_help().split())
    assert config.resume_rules() in text
    for name in config.options(config.KEPT, config.PER_INVOCATION):
        assert config.flag(name) in text


def test_readme_lists_what_resume_may_change_as_generated():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    found = re.findall(r"<!-- resume-rules:.*?-->(.*?)<!-- /resume-rules -->", readme, flags=re.S)
    assert len(found) == 1, "README.md: one <!-- resume-rules: ... --> ... <!-- /resume-rules --> block"
    expected = config.resume_rules("`{}`")
    assert " ".join(found[0].split()) == expected, f"README.md's resume list is stale; it should read:\n{expected}"


# ------------------------------------------------------------------------------------------------------
# one source for the facts the trainer shares
def _backend_tuples(path: str) -> list:
    with open(path) as f:
        tree = ast.parse(f.read())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Tuple)
            and [getattr(e, "value", None) for e in node.elts] == list(aimkern.backends.BACKENDS)]


# Still their own copy, to be switched to aimkern.backends by their owners (issue 27): remove when done.
_PENDING = {os.path.join("aimkern", "ops", "_checks.py"), os.path.join("aimkern", "models", "config.py")}


def test_backend_names_have_one_source():
    assert _actions()["backend"].choices is aimkern.backends.BACKENDS
    copies = []
    for folder, _, files in os.walk(os.path.join(REPO, "aimkern")):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, REPO)
            if name.endswith(".py") and rel not in _PENDING and rel != os.path.join("aimkern", "backends.py"):
                copies += [f"{rel}:{line}" for line in _backend_tuples(path)]
    assert not copies, f"the backend names written again (use aimkern.backends.BACKENDS): {copies}"


@pytest.mark.parametrize("kw", [
    {}, {"img_size": 16}, {"objective": "token"}, {"objective": "token", "vocab_size": 32},
    {"objective": "pixel", "vocab_size": 32}, {"backend": "reference"},
])
def test_one_preset_override_rule_for_the_parser_and_the_model(kw):
    from aimkern.train.model import build_model, model_config

    cfg = model_config("vit-tiny", **kw)
    assert build_model("vit-tiny", **kw).config == cfg
    assert cfg.head == kw.get("objective", "pixel") and cfg.backend == kw.get("backend", "auto")
    assert cfg.vocab_size == (kw.get("vocab_size", 8192) if kw.get("objective") == "token" else 8192)


# ------------------------------------------------------------------------------------------------------
def test_token_objective_reads_the_geometry_without_building_a_model(tmp_path, monkeypatch):
    """_tokenizer needs the patch and image sizes only: for aim-7b a model is 7B fp32 parameters on the CPU."""
    pytest.importorskip("aimkern.tokenizers")
    from aimkern.distributed import DistEnv
    from aimkern.train import session

    args = parse_args(["--objective", "token", "--vocab-size", "8", "--tokenizer-images", "16", "--batch-size", "8",
                       "--device", "cpu", "--no-progress", "--out", str(tmp_path)])

    def no_module(self, *a, **k):
        raise AssertionError("_tokenizer built an nn.Module")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_module)
    tok = session._tokenizer(args, DistEnv(), resumed=False)
    assert (tok.vocab_size, tok.patch_size) == (8, 4) and os.path.isfile(tmp_path / "tokenizer.pt")


# ------------------------------------------------------------------------------------------------------
# the progress bar: on a terminal only
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_only_on_a_terminal_else_log_lines(terminal, monkeypatch, capsys):
    from aimkern.distributed import DistEnv
    from aimkern.train.metering import Console

    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    console = Console(DistEnv())
    console.progress(4, 0, enabled=True)
    console.tick()
    console.show(1, loss="0.5000")
    console.close()
    out = capsys.readouterr().out
    assert ("pretrain" in err.getvalue()) is terminal and ("\r" in err.getvalue()) is terminal
    assert ("step 1/4: loss=0.5000" in out) is not terminal  # no bar: the figures are a line of their own


def test_default_run_logged_to_a_file_holds_lines_not_progress_updates(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aimkern.train", "--steps", "3", "--log-every", "1", "--save-every", "0",
           "--batch-size", "8", "--device", "cpu", "--out", str(out)]  # the default progress setting
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.run(cmd, cwd=REPO, stdout=so, stderr=se, timeout=300)
    stdout, stderr = (tmp_path / "stdout").read_bytes().decode(), (tmp_path / "stderr").read_bytes().decode()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "\r" not in stdout + stderr and "pretrain:" not in stderr  # no tqdm updates in the log
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]
    assert list(json.load(open(out / "run.json"))["args"]) == FIELDS  # run.json: TrainConfig's fields
