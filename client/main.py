"""The ``pfbuild`` console script: a remembered hit is answered before anything else is
loaded (``client/quickhit.py``); every other call is the command line of ``client/cli.py``."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from pfbuild.client.quickhit import quick_main

    answered = quick_main(sys.argv[1:] if argv is None else argv)
    if answered is not None:
        return answered
    from pfbuild.client.cli import main as full

    return full(argv)


if __name__ == "__main__":
    sys.exit(main())
