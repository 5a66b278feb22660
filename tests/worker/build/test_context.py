from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from pfbuild.client import fingerprint
from pfbuild.worker.build.context import (
    DOCKERFILE_IN_CONTEXT,
    FIXED_MTIME,
    make_context,
    scan_context,
)


def _tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o775)
    (root / "setup.py").write_text("")
    (root / ".pf_manifest" / "image_build").mkdir(parents=True)
    (root / ".pf_manifest" / "image_build" / "build.log").write_text("log")
    (root / ".tmp-test").mkdir()
    (root / ".tmp-test" / "cache.tar").write_text("tar")
    (root / "secret.env").write_text("TOKEN=1")
    (root / "docs").mkdir()
    (root / "docs" / "keep.md").write_text("keep")
    (root / "docs" / "drop.md").write_text("drop")
    (root / ".dockerignore").write_text("# comment\nsecret.env\ndocs/*\n!docs/keep.md\n")


def _members(repo: Path, dockerfile: str = "FROM x\n") -> list[tarfile.TarInfo]:
    ctx = make_context(scan_context(repo), dockerfile)
    with tarfile.open(fileobj=ctx.fileobj, mode="r|") as tar:
        members = list(tar)
    ctx.close()
    return members


def test_excludes_pfbuild_output_and_dockerignored_paths(tmp_path: Path) -> None:
    _tree(tmp_path)
    names = [m.name for m in _members(tmp_path)]
    assert not any(n.startswith((".pf_manifest", ".tmp-test")) for n in names)
    assert "secret.env" not in names and "docs/drop.md" not in names
    assert "docs/keep.md" in names and "pkg/mod.py" in names
    # our own .dockerignore and Dockerfile travel last, so the engine can drop both
    assert names[-2:] == [".dockerignore", DOCKERFILE_IN_CONTEXT]
    assert names[:-2] == sorted(names[:-2])


def test_headers_are_normalised(tmp_path: Path) -> None:
    _tree(tmp_path)
    os.utime(tmp_path / "setup.py", (12345, 12345))
    for m in _members(tmp_path):
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", FIXED_MTIME)
    modes = {m.name: m.mode for m in _members(tmp_path)}
    assert modes["run.sh"] == 0o755 and modes["setup.py"] == 0o644


def _tar_sha(repo: Path) -> str:
    ctx = make_context(scan_context(repo), "FROM x\n")
    digest = hashlib.sha256(ctx.fileobj.read()).hexdigest()
    ctx.close()
    return digest


def test_same_tree_same_bytes_and_digest_whatever_pfbuild_writes(tmp_path: Path) -> None:
    _tree(tmp_path)
    first, tar = scan_context(tmp_path), _tar_sha(tmp_path)
    (tmp_path / ".pf_manifest" / "image_build" / "manifest.json").write_text("{}")
    (tmp_path / ".tmp-test" / "other").write_text("more")
    (tmp_path / "docs" / "drop.md").write_text("dockerignored: not in the image")
    os.utime(tmp_path / "pkg" / "mod.py", (99, 99))
    assert scan_context(tmp_path).digest == first.digest and _tar_sha(tmp_path) == tar
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert scan_context(tmp_path).digest != first.digest and _tar_sha(tmp_path) != tar


@pytest.mark.parametrize("change", ["content", "mode", "rename", "new file", "link target"])
def test_every_change_the_image_would_see_changes_the_digest(tmp_path: Path, change: str) -> None:
    _tree(tmp_path)
    os.symlink("setup.py", tmp_path / "link.py")
    before = scan_context(tmp_path).digest
    if change == "content":
        (tmp_path / "setup.py").write_text("changed")
    elif change == "mode":
        os.chmod(tmp_path / "setup.py", 0o755)
    elif change == "rename":
        os.rename(tmp_path / "setup.py", tmp_path / "setup2.py")
    elif change == "new file":
        (tmp_path / "pkg" / "new.py").write_text("")
    else:
        os.remove(tmp_path / "link.py")
        os.symlink("run.sh", tmp_path / "link.py")
    assert scan_context(tmp_path).digest != before


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path)
    old = 1_000_000_000
    for p in tmp_path.rglob("*"):
        os.utime(p, (old, old), follow_symlinks=False)
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", -1e12)  # ctime is now: trust it
    first = scan_context(tmp_path)
    reads: list[str] = []
    real_open = open

    def counting_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        reads.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    assert scan_context(tmp_path).digest == first.digest
    assert [r for r in reads if not r.endswith(".dockerignore")] == []


def test_symlinks_stay_links(tmp_path: Path) -> None:
    _tree(tmp_path)
    os.symlink("pkg/mod.py", tmp_path / "link.py")
    link = next(m for m in _members(tmp_path) if m.name == "link.py")
    assert link.issym() and link.linkname == "pkg/mod.py"


@pytest.mark.parametrize("change", ["content", "same size and mtime", "mode", "rename",
                                    "new file", "link target", "dockerignore"])
def test_a_tree_seen_before_is_not_scanned_again_until_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    _tree(tmp_path)
    os.symlink("setup.py", tmp_path / "link.py")
    (tmp_path / "setup.py").write_text("abc")
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", -1e12)  # trust stats taken this very moment
    first = scan_context(tmp_path)
    assert scan_context(tmp_path) is first  # unchanged: the same scan, nothing listed again
    target = tmp_path / "setup.py"
    if change == "content":
        target.write_text("changed")
    elif change == "same size and mtime":
        st = target.stat()
        target.write_bytes(b"xyz")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # only its ctime tells
    elif change == "mode":
        os.chmod(target, 0o755)
    elif change == "rename":
        os.rename(target, tmp_path / "setup2.py")
    elif change == "new file":
        (tmp_path / "pkg" / "new.py").write_text("")
    elif change == "link target":
        os.remove(tmp_path / "link.py")
        os.symlink("run.sh", tmp_path / "link.py")
    else:
        (tmp_path / ".dockerignore").write_text("docs/\nsetup.py\n")
    again = scan_context(tmp_path)
    assert again is not first and again.digest != first.digest


def test_a_tree_changing_now_is_never_taken_from_memory(tmp_path: Path) -> None:
    _tree(tmp_path)  # written this moment: its fingerprint is not trusted
    first = scan_context(tmp_path)
    assert scan_context(tmp_path) is not first
