"""ruff and mypy are part of the test suite, so CI enforces them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")


def test_ruff() -> None:
    _tool("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "client", "worker"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_mypy_strict(tmp_path: Path) -> None:
    _tool("mypy")
    # the installed names are pfbuild.client/pfbuild.worker; mirror them for mypy
    (tmp_path / "pfbuild").mkdir()
    for pkg in ("client", "worker"):
        (tmp_path / "pfbuild" / pkg).symlink_to(ROOT / pkg)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "pfbuild"],
        cwd=tmp_path, capture_output=True, text=True, env={"MYPYPATH": str(tmp_path),
                                                           "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
