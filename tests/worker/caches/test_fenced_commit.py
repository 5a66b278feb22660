"""One committed tarball per fence: an older holder never commits over a newer one, and
the checksum is written only once the tarball is durable."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from pfbuild.client.errors import LockLost
from pfbuild.worker import layout
from pfbuild.worker.caches import tarball
from pfbuild.worker.caches.trust import TrustStore
from tests.fakes import FakeEngine, image_tar

TAG = "patchfoundry/p1:latest"


def _engine(payload: bytes) -> FakeEngine:
    engine = FakeEngine()
    engine.blobs[TAG] = image_tar(TAG, payload)
    return engine


def _save(engine: FakeEngine, cache_dir: Path, fence: int | None, guard=lambda: None):  # type: ignore[no-untyped-def]
    return tarball.save_tarball(engine, TAG, cache_dir, "p1", level=3, threads=1,
                              trust=TrustStore(cache_dir.parent / "trust"), guard=guard,
                              fence=fence)


def _sidecar_agrees(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256").read_text().split()[0]
    return side == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_stalled_older_holder_never_commits_over_a_newer_one(tmp_path: Path) -> None:
    """Holder 5 passes its lock check, stalls (its lock expires), holder 6 commits; then
    holder 5 renames its file: readers still get 6, and 5's file is removed."""
    cache_dir = tmp_path / "cache"
    checks = []

    def stalled_guard() -> None:
        checks.append(1)
        if len(checks) == 1:  # the check passes, then the stall: a newer holder commits
            _save(_engine(b"new" * 30_000), cache_dir, fence=6)
            return
        raise LockLost("expired")  # what lock.check says once it runs again

    with pytest.raises(LockLost):
        _save(_engine(b"old" * 30_000), cache_dir, fence=5, guard=stalled_guard)
    found = tarball.find_tarball(cache_dir, "p1")
    assert found == cache_dir / layout.tarball_name("p1", 6)
    assert sorted(p.name for p in cache_dir.iterdir()) == [found.name, found.name + ".sha256"]
    assert _sidecar_agrees(found)
    engine = FakeEngine()
    tarball.load_tarball(engine, found, TAG, trust=TrustStore(tmp_path / "trust"))
    assert b"new" * 100 in engine.blobs[TAG]


def test_a_newer_fence_removes_older_tarballs(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _save(_engine(b"a" * 1000), cache_dir, fence=None)  # saved with no queue
    _save(_engine(b"b" * 1000), cache_dir, fence=3)
    info = _save(_engine(b"c" * 1000), cache_dir, fence=1_800_000_000_000)
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        Path(info.path).name, Path(info.path).name + ".sha256"]
    assert tarball.find_tarball(cache_dir, "p1") == Path(info.path)
    assert layout.fenced_tarballs(cache_dir, "p1") == [(1_800_000_000_000, Path(info.path))]
    assert layout.fenced_tarballs(cache_dir, "p") == []  # another profile's prefix


def test_the_checksum_follows_a_durable_tarball(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fails the fsync of a new tarball: the old tarball and its old checksum
    stay, side by side and in agreement; no temporary file is left."""
    cache_dir = tmp_path / "cache"
    old = Path(_save(_engine(b"old" * 1000), cache_dir, fence=2).path)
    import os

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        _save(_engine(b"new" * 1000), cache_dir, fence=3)
    monkeypatch.undo()
    assert sorted(p.name for p in cache_dir.iterdir()) == [old.name, old.name + ".sha256"]
    assert _sidecar_agrees(old)


def test_a_fenced_name_still_names_its_profile() -> None:
    """What reads profile ids back from cache file names (garbage collection) sees
    through the fence."""
    assert layout.unfenced(layout.tarball_name("p1", 42)[: -len(".tar.zst")]) == "p1"
    assert layout.unfenced("p1") == "p1" and layout.unfenced("a+fx") == "a+fx"
    from pfbuild.worker.ops.gc import _tarball_profile

    assert _tarball_profile(Path(layout.tarball_name("abc", 1795777532513))) == "abc"
    assert _tarball_profile(Path("abc.tar")) == "abc"
