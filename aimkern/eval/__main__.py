"""Entry point of ``python -m aimkern.eval`` and of the ``aimkern-eval`` console script."""
from . import evaluate


def main(argv=None) -> None:
    """Console entry: evaluate with the command line's options (the report is printed and written to
    OUT/eval.json, not returned, so the console script's exit status is 0 on success)."""
    import sys

    words = sys.argv[1:] if argv is None else list(argv)
    if any(w in ("--init", "--head") or w.startswith(("--init=", "--head=")) for w in words):
        from .aim_probe import main as released  # issue 18: Apple's released backbone + probe head

        released(words)
        return
    evaluate(argv)


if __name__ == "__main__":
    main()
