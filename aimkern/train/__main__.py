"""Entry point of ``python -m aimkern.train`` and of the ``aimkern-train`` console script."""
from . import train


def main(argv=None) -> None:
    """Console entry: train with the command line's options (the summary is printed, not returned, so the
    console script's exit status is 0 on success)."""
    train(argv)


if __name__ == "__main__":
    main()
