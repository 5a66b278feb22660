"""ruff, mypy and the house rules are part of the test suite, so CI enforces them."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("client", "worker")
MAX_FUNCTION_LINES = 60


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")


def test_ruff() -> None:
    _tool("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", *PACKAGES, "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_mypy_strict(tmp_path: Path) -> None:
    _tool("mypy")
    # the installed names are pfbuild.client/pfbuild.worker; mirror them for mypy
    (tmp_path / "pfbuild").mkdir()
    for pkg in PACKAGES:
        (tmp_path / "pfbuild" / pkg).symlink_to(ROOT / pkg)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "pfbuild", "-p", "tests"],
        cwd=tmp_path, capture_output=True, text=True, env={"MYPYPATH": str(tmp_path),
                                                           "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        where = path.relative_to(ROOT)
                        long.append(f"{where}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_the_code_cites_no_document_outside_the_repository() -> None:
    cites = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
             if "SPEC" in p.read_text() or "../shared" in p.read_text()]
    assert cites == []
