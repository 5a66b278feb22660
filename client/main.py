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
    """The console script: :func:`main`, then leave without tearing the interpreter down
    when nothing else runs in it.

    A command's work is done when it returns (its output flushed here, its logs flushed,
    a publication handed to a process of its own); freeing every module and object first
    would only make an agent wait longer for the exit (tens of milliseconds with the
    worker's modules loaded). A process with a thread still working (``pfbuild worker``'s
    publications, say) or exit handlers of its own ends the usual way, which waits for
    them."""
    code = main()
    if not _quiet():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed
            stream.flush()
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


def _quiet() -> bool:
    """Whether only this thread runs, and the command is not a farm worker (whose exit
    handlers, Celery's, run the usual way)."""
    threading = sys.modules.get("threading")
    if threading is not None and any(
        t.is_alive() and not t.daemon and t is not threading.main_thread()
        for t in threading.enumerate()
    ):
        return False
    return "worker" not in sys.argv[1:2]  # a farm worker's exit: the usual way


if __name__ == "__main__":
    run()
