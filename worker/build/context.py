"""The build context: a tar the project makes itself, the same bytes for the same tree.

Docker's classic builder keys the ``COPY . /workspace`` layer on the files' contents *and*
headers, so a context tar with sorted entries, owner 0:0 and one fixed mtime keeps the
layer cache valid across checkouts, clocks and users. pfbuild's own output
(``.pf_manifest/``, ``.tmp-test/``) never enters it, so writing a log or a manifest never
invalidates the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Generic, TypeVar

from docker.utils.build import exclude_paths

from pfbuild.client import fingerprint
from pfbuild.client.fingerprint import tree_fingerprint
from pfbuild.client.inputs import read_bounded
from pfbuild.worker.layout import EXCLUDED_FROM_CONTEXT

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["DOCKERFILE_IN_CONTEXT", "BuildContext", "ContextScan", "make_context", "scan_context"]

# The Dockerfile travels inside the context under this name; the synthesised
# .dockerignore lists it, which makes the engine drop it (and .dockerignore) before COPY,
# so the variant being built never changes the COPY layer.
DOCKERFILE_IN_CONTEXT = ".pfbuild.Dockerfile"
# 2000-01-01: a fixed mtime after 1980, because zip (and so wheel builds from /workspace)
# cannot store earlier times.
FIXED_MTIME = 946684800
_SPOOL_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
DOCKERIGNORE_MAX_BYTES = 256 * 1024


class BuildContext:
    """A finished context tar, spooled to disk past 16 MiB."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj

    def close(self) -> None:
        self.fileobj.close()


@dataclass(frozen=True)
class ContextScan:
    """The entries a build context holds, and the digest of the code they carry.

    ``digest`` is the identity of what ``COPY . /workspace`` puts in the image: the sha256
    over every entry's kind, normalised mode, name and content (or link target), in the
    context's order. Same tree, same digest; any change the image would see, a new one.
    """

    root: Path
    names: tuple[str, ...]
    digest: str
    files: int
    bytes: int


class _Memo(Generic[K, V]):
    """A dict shared by threads, emptied when it reaches ``limit`` entries: a per-process
    memo whose worst case is a miss, never a wrong answer or unbounded memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            self._entries[key] = value


class _StatIndex:
    """Content hashes of files keyed by what ``stat`` says of them (as git's index does),
    so an unchanged file is not read again. Per process, bounded; entries modified in the
    last seconds are not kept, since a write within the clock's resolution would not
    change the stat (git's "racily clean" files, ``fingerprint.RACY_SECONDS``)."""

    MAX_ENTRIES = 500_000

    def __init__(self) -> None:
        self._memo: _Memo[str, tuple[tuple[int, int, int, int], str]] = _Memo(self.MAX_ENTRIES)

    def sha256(self, path: str, st: os.stat_result) -> str:
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        known = self._memo.get(path)
        if known is not None and known[0] == key:
            return known[1]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        value = digest.hexdigest()
        if time.time() - max(st.st_mtime, st.st_ctime) > fingerprint.RACY_SECONDS:
            self._memo.put(path, (key, value))
        return value


_INDEX = _StatIndex()


def _read_dockerignore(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not (path.exists() or path.is_symlink()):
        return []
    # the repository's file: a regular one, not a link, a FIFO or a device, and not huge
    raw = read_bounded(
        path, what=".dockerignore", limit=DOCKERIGNORE_MAX_BYTES, follow_symlinks=False
    )
    lines = raw.decode("utf-8", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _mode(mode: int, is_dir: bool) -> int:
    # Keep the execute bits (scripts need them) but drop umask and setuid noise.
    return 0o755 if mode & 0o111 or is_dir else 0o644


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = FIXED_MTIME
    info.mode = _mode(info.mode, info.isdir())
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _normalise(tarfile.TarInfo(name))
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Scans:
    """The last scan of each tree, kept with the tree's stat fingerprint taken before it
    (:func:`pfbuild.client.fingerprint.tree_fingerprint`): a checkout seen before whose every
    entry's stat is unchanged is not listed, matched against .dockerignore or looked up
    file by file again. The fingerprint is taken before the scan, so a tree that changed
    while it was scanned has another one next time; one taken while an entry changed in
    the last seconds is None, and nothing is kept or reused for it. Per process, bounded."""

    MAX_TREES = 10_000

    def __init__(self) -> None:
        self._memo: _Memo[Path, tuple[str, ContextScan]] = _Memo(self.MAX_TREES)

    def scan(self, root: Path) -> ContextScan:
        seen = tree_fingerprint(str(root))
        if seen is not None:
            kept = self._memo.get(root)
            if kept is not None and kept[0] == seen:
                return kept[1]
        scan = _scan(root)
        if seen is not None:
            self._memo.put(root, (seen, scan))
        return scan


_SCANS = _Scans()


def scan_context(repo_dir: str | Path) -> ContextScan:
    """List the context's entries (less pfbuild's output and .dockerignore'd paths) and
    digest the code they hold; a tree whose stat fingerprint is unchanged is not scanned
    again (:class:`_Scans`), nor an unchanged file read again (:class:`_StatIndex`)."""
    return _SCANS.scan(Path(repo_dir).resolve())


def _scan(root: Path) -> ContextScan:
    # ours come last, so that no "!pattern" of the repo's can bring pfbuild's output back
    patterns = [*_read_dockerignore(root), *EXCLUDED_FROM_CONTEXT]
    names = sorted(exclude_paths(str(root), patterns, dockerfile=DOCKERFILE_IN_CONTEXT))
    # The repo's own .dockerignore was applied above; ours replaces it in the context.
    names = [n for n in names if n not in (".dockerignore", DOCKERFILE_IN_CONTEXT)]
    digest = hashlib.sha256()
    files = size = 0
    for name in names:
        path = os.path.join(root, name)
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            kind, content = "file", _INDEX.sha256(path, st)
            files, size = files + 1, size + st.st_size
        elif stat.S_ISDIR(st.st_mode):
            kind, content = "dir", ""
        elif stat.S_ISLNK(st.st_mode):
            kind, content = "link", os.readlink(path)
        else:
            continue  # sockets, fifos and devices have no place in an image context
        mode = _mode(st.st_mode, kind == "dir")
        digest.update(f"{kind} {mode:o} {name}\0{content}\n".encode("utf-8", "surrogateescape"))
    return ContextScan(root, tuple(names), digest.hexdigest(), files, size)


def make_context(scan: ContextScan, dockerfile: str) -> BuildContext:
    """Tar the scanned entries plus the Dockerfile: the same bytes for the same tree."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
    with tarfile.open(fileobj=spool, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in scan.names:
            path = scan.root / name
            info = _normalise(tar.gettarinfo(str(path), arcname=name))
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
            # sockets, fifos and devices have no place in an image context
        _add_bytes(tar, ".dockerignore", f".dockerignore\n{DOCKERFILE_IN_CONTEXT}\n".encode())
        _add_bytes(tar, DOCKERFILE_IN_CONTEXT, dockerfile.encode("utf-8"))
    spool.seek(0)
    return BuildContext(spool)
