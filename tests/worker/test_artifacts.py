"""Atomic files: whole or absent, never through a symlink; JSON updates under a lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pfbuild.worker.artifacts import atomic_file, atomic_write_text, locked_json_update


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_on_error_may_keep_what_was_written(tmp_path: Path) -> None:
    target = tmp_path / "log"
    with pytest.raises(RuntimeError), atomic_file(target, on_error=lambda fh, exc: True) as fh:
        fh.write(b"kept")
        raise RuntimeError("stop")
    assert target.read_bytes() == b"kept"


def test_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(outside)
    atomic_write_text(link, "new")
    assert outside.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"


def test_json_update_counts_and_survives_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "reg.json"
    path.write_text("{not json")
    for _ in range(3):
        locked_json_update(path, lambda d: d.__setitem__("n", d.get("n", 0) + 1))
    assert '"n": 3' in path.read_text()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
