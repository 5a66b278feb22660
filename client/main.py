"""The ``pfbuild`` console script: a remembered hit is answered before anything else is
loaded (``client/quickhit.py``); every other call is the command line of ``client/cli.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from pfbuild.client.quickhit import quick_main

    answered = quick_main(sys.argv[1:] if argv is None else argv)
    if answered is not None:
        return answered
    from pfbuild.client.cli import main as full

    return full(argv)


def run() -> NoReturn:
    """The console script: :func:`main`, then leave without tearing the interpreter down.

    A command's work is done when it returns (its output flushed here, its logs flushed,
    a publication handed to a process of its own); freeing every module and object
    first would only make an agent wait longer for the exit (tens of milliseconds with the
    worker's modules loaded)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed
            stream.flush()
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
