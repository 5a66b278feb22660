"""Files that are never seen half-written: write to a temporary sibling, fsync, rename.

Where those files live is :mod:`pfbuild.worker.layout`'s business.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from pfbuild.client.errors import BadRequest
from pfbuild.client.inputs import JsonLimits, loads_strict, read_bounded

__all__ = [
    "HashingWriter",
    "atomic_file",
    "atomic_write_text",
    "exclusive_lock",
    "locked_json_update",
]

T = TypeVar("T")

# A state file pfbuild writes in a repository (unsupported_registry.json) is read back at
# most this large; a bigger one is replaced (it holds one small entry per profile+class).
STATE_FILE_MAX_BYTES = 16 * 1024 * 1024
_STATE_JSON = JsonLimits(max_bytes=STATE_FILE_MAX_BYTES, max_depth=16, max_number_digits=40)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | Path,
    on_error: Callable[[IO[bytes], BaseException], bool] | None = None,
    *,
    durable: bool = True,
) -> Iterator[IO[bytes]]:
    """Yield a binary file that appears at ``path`` whole, or not at all.

    If the body raises, the file is dropped, unless ``on_error(file, exc)`` returns True:
    then what was written so far is committed (a log of a failed run, say). ``durable``
    fsyncs the file and its folder before and after the rename; without it the file is
    still never seen torn, but a machine crash may lose it (fine for what a cache hit
    rewrites: the next request writes it again).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                yield fh
            except BaseException as exc:
                if on_error is None or not on_error(fh, exc):
                    raise
                _commit(fh, tmp, target, durable)
                raise
            _commit(fh, tmp, target, durable)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit(fh: IO[bytes], tmp: Path, target: Path, durable: bool) -> None:
    fh.flush()
    if durable:
        os.fsync(fh.fileno())
    os.replace(tmp, target)  # replaces a symlink at target, never writes through it
    if durable:
        _fsync_dir(target.parent)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never via a symlink)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    with atomic_file(path, durable=durable) as fh:
        fh.write(text.encode("utf-8"))


def locked_json_update(path: str | Path, update: Callable[[dict[str, Any]], T]) -> T:
    """Read-modify-write a JSON object under an exclusive ``flock``, then replace atomically.

    Two processes updating the same file serialise on ``{path}.lock``; a reader without
    the lock still sees either the old or the new file, never a torn one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        try:
            # never through a symlink (it could point at any JSON file on the worker, whose
            # content would be merged in and written back), never a FIFO, never unbounded
            raw = read_bounded(
                target,
                what="state file",
                limit=STATE_FILE_MAX_BYTES,
                follow_symlinks=False,
            )
            data = loads_strict(raw, what=str(target), limits=_STATE_JSON)
        except BadRequest:
            data = {}  # missing, damaged or planted: replaced rather than blocking every build
        if not isinstance(data, dict):
            data = {}
        result = update(data)
        atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return result


class HashingWriter(io.RawIOBase):
    """Writes through to ``target`` while hashing (sha256) and counting the bytes."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self.target.write(view)
        return view.nbytes
