"""Entry point of ``python -m aimkern.train`` and of the ``aimkern-train`` console script."""
import os
import sys

from . import train
from .errors import RunError


def main(argv=None) -> None:
    """Console entry: train with the command line's options (the summary is printed, not returned, so the
    console script's exit status is 0 on success). A ``RunError`` is one line on stderr (rank 0 only) and
    its exit status (errors.py); ``Preempted`` exits with its own status."""
    try:
        train(argv)
    except RunError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"python -m aimkern.train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
