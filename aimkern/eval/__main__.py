"""Entry point of ``python -m aimkern.eval`` and of the ``aimkern-eval`` console script."""
from . import evaluate


def main(argv=None) -> None:
    """Console entry: evaluate with the command line's options (the report is printed and written to
    OUT/eval.json, not returned, so the console script's exit status is 0 on success)."""
    evaluate(argv)


if __name__ == "__main__":
    main()
