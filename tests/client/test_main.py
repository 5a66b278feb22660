"""The console script leaves at once when its command is done, with the command's exit
code, but never cuts off a thread still working (client/main.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import sys, threading, time
from pathlib import Path
from pfbuild.client import main as entry

def command():
    if sys.argv[1] == "thread":
        def work():
            time.sleep(0.5)
            Path(sys.argv[2]).write_text("done")
        threading.Thread(target=work).start()
    print("answer")
    return 3

entry.main = command
entry.run()
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True,
                          text=True, timeout=60)


def test_the_exit_code_and_output_survive_the_fast_exit(tmp_path: Path) -> None:
    proc = _run("plain", str(tmp_path / "unused"))
    assert proc.returncode == 3 and proc.stdout == "answer\n"


def test_a_working_thread_is_waited_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("thread", str(out))
    assert proc.returncode == 3 and proc.stdout == "answer\n"
    assert out.read_text() == "done"  # a hard exit would have cut the thread off
