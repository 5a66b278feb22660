"""The build context: a tar the project makes itself, the same bytes for the same tree.

Docker's classic builder keys the ``COPY . /workspace`` layer on the files' contents *and*
headers, so a context tar with sorted entries, owner 0:0 and one fixed mtime keeps the
layer cache valid across checkouts, clocks and users. pfbuild's own output
(``.pf_manifest/``, ``.tmp-test/``) never enters it, so writing a log or a manifest never
invalidates the cache.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import IO

from docker.utils.build import exclude_paths

from pfbuild.client.inputs import read_bounded
from pfbuild.worker.artifacts import HashingWriter

__all__ = ["ALWAYS_EXCLUDED", "DOCKERFILE_IN_CONTEXT", "BuildContext", "make_context"]

ALWAYS_EXCLUDED = (".pf_manifest", ".tmp-test")
# The Dockerfile travels inside the context under this name; the synthesised
# .dockerignore lists it, which makes the engine drop it (and .dockerignore) before COPY,
# so the variant being built never changes the COPY layer.
DOCKERFILE_IN_CONTEXT = ".pfbuild.Dockerfile"
# 2000-01-01: a fixed mtime after 1980, because zip (and so wheel builds from /workspace)
# cannot store earlier times.
FIXED_MTIME = 946684800
_SPOOL_BYTES = 16 * 1024 * 1024
DOCKERIGNORE_MAX_BYTES = 256 * 1024


class BuildContext:
    """A finished context tar (spooled to disk past 16 MiB) and its sha256."""

    def __init__(self, fileobj: IO[bytes], sha256: str, size: int, files: int) -> None:
        self.fileobj = fileobj
        self.sha256 = sha256
        self.size = size
        self.files = files

    def close(self) -> None:
        self.fileobj.close()


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


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = FIXED_MTIME
    # Keep the execute bits (scripts need them) but drop umask and setuid noise.
    executable = info.mode & 0o111 or info.isdir()
    info.mode = 0o755 if executable else 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _normalise(tarfile.TarInfo(name))
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_context(repo_dir: str | Path, dockerfile: str) -> BuildContext:
    """Tar ``repo_dir`` (less pfbuild's output and .dockerignore'd paths) plus the Dockerfile."""
    root = Path(repo_dir).resolve()
    # ours come last, so that no "!pattern" of the repo's can bring pfbuild's output back
    patterns = [*_read_dockerignore(root), *ALWAYS_EXCLUDED]
    names = sorted(exclude_paths(str(root), patterns, dockerfile=DOCKERFILE_IN_CONTEXT))
    # The repo's own .dockerignore was applied above; ours replaces it in the context.
    names = [n for n in names if n not in (".dockerignore", DOCKERFILE_IN_CONTEXT)]
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
    sink = HashingWriter(spool)
    files = 0
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            path = root / name
            info = _normalise(tar.gettarinfo(str(path), arcname=name))
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
                files += 1
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
            # sockets, fifos and devices have no place in an image context
        _add_bytes(tar, ".dockerignore", f".dockerignore\n{DOCKERFILE_IN_CONTEXT}\n".encode())
        _add_bytes(tar, DOCKERFILE_IN_CONTEXT, dockerfile.encode("utf-8"))
    spool.seek(0)
    return BuildContext(spool, sink.digest.hexdigest(), sink.size, files)
