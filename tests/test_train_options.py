"""python -m aimkern.train: every option that can be checked before setup fails early, as one argparse line
(exit status 2); --help imports no torch; the loop and the tokenizer take the loss's bookkeeping from the
op's module, not the reference; the tokenizer fit announces itself, estimates its time and shows progress.
"""
import ast
import os
import subprocess
import sys

import pytest
import torch

from aimkern.train import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, says", [
    (["--img-size", "30"], "--img-size 30 must be a multiple of vit-tiny's patch size 4"),
    (["--objective", "token", "--tokenizer", "missing.pt"], "--tokenizer missing.pt: no such file"),
    (["--lr", "1e6"], "--lr 1000000.0 is above 1.0"),
    (["--lr", "nan"], "--lr: must be a finite float > 0"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--objective", "token", "--vocab-size", "1"], "vocab_size"),
    (["--min-lr", "-1"], "--min-lr: must be a finite float >= 0"),
    (["--keep", "0"], "--keep: must be an int >= 1"),
])
def test_bad_options_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_cuda_device_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(SystemExit) as e:
        parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_batch_must_split_over_torchrun_ranks_said_once_by_rank_0(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        parse_args(["--batch-size", "8"])
    assert e.value.code == 2 and "multiple of the number of processes (3)" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        parse_args(["--batch-size", "8"])
    assert e.value.code == 2 and capsys.readouterr().err == ""  # rank 0 speaks for all


def test_help_and_parsing_import_no_torch():
    code = ("import sys; import aimkern.train as t; t.build_parser().format_help(); t.parse_args([]); "
            "print(sorted(m for m in ('torch', 'triton', 'timm', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_help_exits_0_and_bad_option_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "aimkern.train", "--img-size", "30"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def _imports(path: str) -> set:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_training_and_tokenizer_do_not_import_the_reference():
    """The ops run training; aimkern.reference is the tests' definition and the ops' CPU fallback."""
    pkg = os.path.join(REPO, "aimkern")
    files = [os.path.join(pkg, d, f) for d in ("train", "tokenizers") for f in os.listdir(os.path.join(pkg, d))
             if f.endswith(".py")]
    offenders = {f: m for f in files for m in _imports(f) if "reference" in m}
    assert not offenders, offenders
    from aimkern.ops.pixel_loss import patch_targets, target_count
    from aimkern.reference import counted_targets, pixel_targets

    prefix = torch.tensor([0, 3, 16])
    assert torch.equal(target_count(3, 16, 1, prefix), counted_targets(3, 16, 1, prefix))
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(patch_targets(images, 4), pixel_targets(images, 4))


@pytest.mark.parametrize("terminal", [True, False])
def test_tokenizer_fit_announces_estimates_warns_and_shows_progress(tmp_path, monkeypatch, capsys, terminal):
    pytest.importorskip("aimkern.tokenizers")
    from aimkern.train import tokens
    from aimkern.distributed import DistEnv

    monkeypatch.setattr(tokens, "SLOW_FIT_S", 0.0)  # every estimate counts as slow
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)  # the bar shows on a terminal only
    images = torch.randn(8, 1, 16, 16)
    tok = tokens.prepare_tokenizer(path=None, out_dir=str(tmp_path), resume=False, vocab_size=8, patch_size=4,
                                   fit_batches=[images], fit_images=8, env=DistEnv(), progress=True)
    captured = capsys.readouterr()
    assert "fitting a k-means tokenizer: 8 centroids on 128 patches of 16 values on cpu, about" in captured.out
    assert "warning: --vocab-size 8 is large for cpu" in captured.out
    assert ("tokenizer fit" in captured.err) is terminal  # tqdm's bar; in a log file, none
    assert tok.vocab_size == 8 and os.path.isfile(tmp_path / "tokenizer.pt")
