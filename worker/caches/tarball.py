"""The tarball cache: ``{cache_dir}/{profile_id}.tar[.zst]``, streamed both ways.

Saving streams ``docker save`` through zstd into a temporary file, fsyncs it, records its
sha256 in the worker's trust records (see ``trust``), renames it into place (a reader
never sees a partial tarball) under a name that carries the lock's fence (a stalled older
holder never replaces a newer holder's file; readers take the highest fence), and only
then writes its ``.sha256`` sidecar. Loading first hashes the
file and loads it only if the trust records say pfbuild saved exactly those bytes for
exactly this tag; then it streams the file (decompressing zstd on the way, since engines
before 23 refuse zstd in ``docker load``) into the engine in bounded memory, checking the
sha256 again as the bytes pass. Anything else (a ``{profile_id}.tar`` another tool left,
a tarball planted with a matching sidecar, one that is a symlink, a FIFO or a device) is
moved to ``quarantine/`` before the engine sees it, and the build goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal, cast

import zstandard

from pfbuild.client.errors import BadRequest, ImageLoadFailed, LockLost, TarballRejected
from pfbuild.client.inputs import read_bounded
from pfbuild.client.models import TarballInfo
from pfbuild.worker import layout
from pfbuild.worker.artifacts import HashingWriter, atomic_file, atomic_write_text
from pfbuild.worker.caches.trust import TrustStore
from pfbuild.worker.engine import Engine, ImageInfo

__all__ = ["find_tarball", "load_tarball", "quarantine", "save_tarball"]

log = logging.getLogger(__name__)

Compression = Literal["zstd", "gzip", "none"]
_CHUNK = 1024 * 1024
_AHEAD = 8  # chunks decoded ahead of the engine
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_SIDECAR_MAX_BYTES = 4096


def find_tarball(cache_dir: Path, profile_id: str) -> Path | None:
    """Ours first: the highest fence (the newest holder's), then one saved without a
    fence; then a ``.tar`` another tool may have left."""
    for _, path in layout.fenced_tarballs(cache_dir, profile_id):
        if path.is_file():
            return path
    for name in (layout.tarball_name(profile_id), f"{profile_id}.tar"):
        path = cache_dir / name
        if path.is_file():
            return path
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sniff(fh: IO[bytes]) -> Compression:
    fh.seek(0)
    head = fh.read(4)
    fh.seek(0)
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    return "none"


def quarantine(path: Path, reason: str) -> Path:
    """Move a bad tarball (and its sidecar) aside so that no later run trips on it."""
    qdir = path.parent / layout.QUARANTINE_DIR
    if qdir.is_symlink() or (qdir.exists() and not qdir.is_dir()):
        # a cache folder inside a repo is the repo's to shape: drop, never follow
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
        log.warning("deleted tarball %s (quarantine is a symlink): %s", path, reason)
        return path
    qdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = qdir / f"{path.name}.{stamp}.{os.getpid()}"
    os.replace(path, dest)
    side = _sidecar(path)
    if side.is_symlink() or side.exists():
        os.replace(side, dest.with_name(dest.name + ".sha256"))
    log.warning("quarantined tarball %s -> %s: %s", path, dest, reason)
    return dest


class _HashingReader:
    """A read()-able file that hashes what passes through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def _decode(reader: _HashingReader, compression: Compression) -> Iterator[bytes]:
    if compression == "zstd":
        yield from zstandard.ZstdDecompressor().read_to_iter(
            cast(IO[bytes], reader), read_size=_CHUNK, write_size=_CHUNK
        )
    else:
        # plain and gzip tars go to the engine as they are: it decompresses gzip itself
        while chunk := reader.read(_CHUNK):
            yield chunk
    while reader.read(_CHUNK):  # hash any trailing bytes the decoder did not need
        pass


def _prefetch(source: Iterator[bytes]) -> Iterator[bytes]:
    """Run ``source`` on a helper thread, ``_AHEAD`` chunks ahead of the consumer.

    Socket I/O, hashing and zstd all release the GIL, so producing (reading from the
    engine, or decoding a file) overlaps with consuming (compressing, or sending to the
    engine). The queue is bounded, so memory stays at a few chunks whatever the image size.
    """
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in source:
                while not stop.is_set():
                    try:
                        chunks.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            chunks.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            chunks.put(exc)

    thread = threading.Thread(target=produce, name="pfbuild-tarball-reader", daemon=True)
    thread.start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _sha256_of(fh: IO[bytes]) -> str:
    digest = hashlib.sha256()
    fh.seek(0)
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    fh.seek(0)
    return digest.hexdigest()


def _expected_digest(path: Path) -> str | None:
    """The sidecar's sha256; None without a sidecar, "" for one that cannot be read
    (a FIFO, a device, a symlink, or more than a line)."""
    side = _sidecar(path)
    if not (side.exists() or side.is_symlink()):
        return None
    try:
        raw = read_bounded(
            side,
            what="sidecar",
            limit=_SIDECAR_MAX_BYTES,
            follow_symlinks=False,
        )
        words = raw.decode("ascii").split()
    except (BadRequest, UnicodeDecodeError):
        return ""
    return words[0] if words and len(words[0]) == 64 else ""


def _open_regular(path: Path) -> IO[bytes] | None:
    """``path`` opened for reading if it is a regular file (not a symlink, FIFO or device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _loaded_names(lines: list[str]) -> list[str]:
    """What `docker load` reported: tags (``Loaded image: x``) and untagged ids."""
    names = []
    for line in lines:
        for prefix in ("Loaded image: ", "Loaded image ID: "):
            if line.startswith(prefix):
                names.append(line[len(prefix) :].strip())
    return names


def _reject(path: Path, reason: str) -> TarballRejected:
    """Quarantine ``path`` and say why, as the error the pipeline turns into an event."""
    moved_to = quarantine(path, reason)
    return TarballRejected(reason, details={"moved_to": str(moved_to)})


def load_tarball(
    engine: Engine, path: Path, tag: str, *, trust: TrustStore
) -> tuple[TarballInfo, ImageInfo]:
    """Stream ``path`` into ``engine`` if pfbuild saved it for ``tag``; check what it loaded.

    The file is hashed first, and reaches the engine only if ``trust`` records that
    digest for exactly ``tag`` (and its sidecar, if any, agrees). Raises
    :class:`TarballRejected` after quarantining the file otherwise, or when the load
    fails or yields anything but ``tag``. Only ``tag`` is ever untagged: an image the
    request does not own is never removed.
    """
    fh = _open_regular(path)
    if fh is None:
        raise _reject(path, "not a regular file (a symlink, FIFO or device)")
    with fh:
        size = os.fstat(fh.fileno()).st_size
        actual = _sha256_of(fh)
        expected = _expected_digest(path)
        if expected is not None and actual != expected:
            shown = expected or "(unreadable)"
            raise _reject(path, f"sha256 mismatch: sidecar says {shown}, file is {actual}")
        trusted_tag = trust.tag_of(actual)
        if trusted_tag != tag:
            raise _reject(
                path,
                f"pfbuild did not save this tarball for {tag} (sha256 {actual} is not in the "
                "worker's trust records); it is never sent to the engine",
            )
        compression = _sniff(fh)
        reader = _HashingReader(fh)
        try:
            loaded = engine.load(_prefetch(_decode(reader, compression)))
        except (ImageLoadFailed, zstandard.ZstdError) as exc:
            raise _reject(path, f"engine refused the tarball: {exc}") from None
        # the engine read the very bytes that were checked, or the file changed under us
        changed = reader.digest.hexdigest() != actual
    foreign = [name for name in _loaded_names(loaded) if name != tag]
    image = None if changed or foreign else engine.inspect(tag)
    if image is None:
        if changed:
            problem = "the tarball changed while it was being loaded"
        elif foreign:
            problem = f"the tarball carries other images too: {', '.join(foreign)}"
        else:
            problem = f"the tarball does not hold {tag}"
        engine.remove(tag)  # ours, and what it points at cannot be trusted
        raise _reject(path, problem)
    info = TarballInfo(path=str(path), sha256=actual, size=size, compression=compression)
    return info, image


def save_tarball(
    engine: Engine,
    tag: str,
    cache_dir: Path,
    profile_id: str,
    *,
    level: int,
    threads: int,
    trust: TrustStore,
    guard: Callable[[], None] = lambda: None,
    fence: int | None = None,
) -> TarballInfo:
    """Save ``tag`` as ``{profile_id}+f{fence}.tar.zst`` (``{profile_id}.tar.zst`` with no
    fence) atomically, record its digest in ``trust`` (the only tarballs
    :func:`load_tarball` loads), then write its sha256 sidecar.

    ``guard`` runs after the data is written and before it is renamed into place; if it
    raises (the lock was lost, say), nothing appears in the cache. The fence enforces
    what the guard only checks: each holder commits its own file, readers take the
    highest fence, and a holder that stalled past its lock (between its guard and its
    rename) finds a newer fence committed and removes its own file. The sidecar is
    written once the tarball is durable, so a failed write never leaves a new checksum
    beside an old tarball.
    """
    path = cache_dir / layout.tarball_name(profile_id, fence)
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with atomic_file(path) as fh:
        hashing = HashingWriter(fh)
        with compressor.stream_writer(cast(IO[bytes], hashing), closefd=False) as zw:
            for chunk in _prefetch(engine.save(tag)):
                zw.write(chunk)
        digest, size = hashing.digest.hexdigest(), hashing.size
        guard()
        trust.record(digest, tag, size=size)
    atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")
    if fence is not None:
        _supersede(cache_dir, profile_id, fence, path, guard)
    return TarballInfo(path=str(path), sha256=digest, size=size, compression="zstd")


def _supersede(
    cache_dir: Path, profile_id: str, fence: int, path: Path, guard: Callable[[], None]
) -> None:
    """Keep only the newest fence's tarball: remove older ones, or ours if it is older."""
    fenced = layout.fenced_tarballs(cache_dir, profile_id)
    if fenced and fenced[0][0] > fence:
        for gone in (path, _sidecar(path)):
            gone.unlink(missing_ok=True)
        log.warning("tarball %s superseded by fence %d; removed", path.name, fenced[0][0])
        guard()  # the lock is someone else's by now: this raises LockLost
        raise LockLost(f"{path.name} was superseded by fence {fenced[0][0]}; stopped")
    older = [p for f, p in fenced if f < fence] + [cache_dir / layout.tarball_name(profile_id)]
    for old in older:
        for gone in (old, _sidecar(old)):
            gone.unlink(missing_ok=True)
