"""The tarball cache: ``{cache_dir}/{profile_id}.tar[.zst]``, streamed both ways.

Saving streams ``docker save`` through zstd into a temporary file, fsyncs it, records its
sha256 in a ``.sha256`` sidecar and renames it into place: a reader never sees a partial
tarball. Loading streams the file (decompressing zstd on the way, since engines before 23
refuse zstd in ``docker load``) into the engine in bounded memory, checking the sha256 as
the bytes pass. Tarballs written by other tools (``{profile_id}.tar``, plain or gzip) are
read too. A tarball that fails its checksum or its load is moved to ``quarantine/`` and
the build goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal, cast

import zstandard

from pfbuild.client.errors import EngineUnavailable, ImageLoadFailed, TarballRejected
from pfbuild.client.models import TarballInfo
from pfbuild.worker import layout
from pfbuild.worker.artifacts import HashingWriter, atomic_file, atomic_write_text
from pfbuild.worker.engine import Engine, ImageInfo

__all__ = ["find_tarball", "load_tarball", "quarantine", "save_tarball"]

log = logging.getLogger(__name__)

Compression = Literal["zstd", "gzip", "none"]
_CHUNK = 1024 * 1024
_AHEAD = 8  # chunks decoded ahead of the engine
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


def _rejected(path: Path, reason: str) -> TarballRejected:
    """Quarantine ``path`` and say why, as the error the pipeline turns into an event."""
    moved_to = quarantine(path, reason)
    return TarballRejected(reason, details={"moved_to": str(moved_to)})


def find_tarball(cache_dir: Path, profile_id: str) -> Path | None:
    """Ours (``.tar.zst``) first, then a ``.tar`` another tool may have left."""
    for name in (layout.tarball_name(profile_id), f"{profile_id}.tar"):
        path = cache_dir / name
        if path.is_file():
            return path
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sniff(path: Path) -> Compression:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    return "none"


def quarantine(path: Path, reason: str) -> Path:
    """Move a bad tarball (and its sidecar) aside so that no later run trips on it."""
    qdir = path.parent / layout.QUARANTINE_DIR
    if qdir.is_symlink():  # a cache folder inside a repo is the repo's to shape
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
        log.warning("deleted tarball %s (quarantine is a symlink): %s", path, reason)
        return path
    qdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = qdir / f"{path.name}.{stamp}.{os.getpid()}"
    os.replace(path, dest)
    side = _sidecar(path)
    if side.exists():
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digest(path: Path) -> str | None:
    """The sidecar's sha256; None without a sidecar, "" for one that cannot be read."""
    side = _sidecar(path)
    if not side.exists():
        return None
    try:
        words = side.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return ""
    return words[0] if words and len(words[0]) == 64 else ""


def _tags_in_plain_tar(path: Path) -> list[str]:
    """The tags a `docker save` tar's manifest.json names (seeking over the layers)."""
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.getmember("manifest.json")
            fh = tar.extractfile(member)
            entries = json.loads(fh.read()) if fh else []
    except (KeyError, tarfile.TarError, json.JSONDecodeError, OSError):
        return []  # not docker save's layout: the engine will judge it
    if not isinstance(entries, list):
        return []
    return [str(t) for e in entries if isinstance(e, dict) for t in e.get("RepoTags") or []]


def _loaded_names(lines: list[str]) -> list[str]:
    """What `docker load` reported: tags (``Loaded image: x``) and untagged ids."""
    names = []
    for line in lines:
        for prefix in ("Loaded image: ", "Loaded image ID: "):
            if line.startswith(prefix):
                names.append(line[len(prefix) :].strip())
    return names


def load_tarball(engine: Engine, path: Path, tag: str) -> tuple[TarballInfo, ImageInfo]:
    """Stream ``path`` into ``engine`` and check that it yielded ``tag``, and only it.

    Returns what was read and the image it gave.

    With a sidecar, the checksum is verified before anything reaches the engine. Raises
    :class:`TarballRejected` (after quarantining the file and untagging what it loaded)
    when the checksum, the load or the tags are wrong.
    """
    expected = _expected_digest(path)
    if expected is not None:
        actual = _sha256_file(path)
        if actual != expected:
            mismatch = (
                f"sha256 mismatch: sidecar says {expected or '(unreadable)'}, file is {actual}"
            )
            raise _rejected(path, mismatch)
    compression = _sniff(path)
    if compression == "none":
        # a plain tar can be read for its tags without reading its layers: refuse one that
        # would retag other images before it reaches the engine
        retags = [t for t in _tags_in_plain_tar(path) if t != tag]
        if retags:
            refusal = f"the tarball would tag other images: {', '.join(retags)}"
            raise _rejected(path, refusal)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        reader = _HashingReader(fh)
        try:
            loaded = engine.load(_prefetch(_decode(reader, compression)))
        except (ImageLoadFailed, zstandard.ZstdError) as exc:
            raise _rejected(path, f"engine refused the tarball: {exc}") from None
        except EngineUnavailable:
            if expected or not engine.ping():
                raise  # the engine is gone, or the tarball is verified: not its fault
            dropped = "the engine dropped the connection while loading the tarball"
            raise _rejected(path, dropped) from None
    foreign = [name for name in _loaded_names(loaded) if name != tag]
    image = None if foreign else engine.inspect(tag)
    if image is None:
        problem = (
            f"the tarball carries other images too: {', '.join(foreign)}"
            if foreign
            else f"the tarball does not hold {tag}"
        )
        for name in [tag, *foreign]:
            if not name.startswith("sha256:"):
                engine.remove(name)  # what it tagged cannot be trusted, ours or not
        raise _rejected(path, problem)
    info = TarballInfo(
        path=str(path), sha256=reader.digest.hexdigest(), size=size, compression=compression
    )
    return info, image


def save_tarball(
    engine: Engine,
    tag: str,
    cache_dir: Path,
    profile_id: str,
    *,
    level: int,
    threads: int,
    guard: Callable[[], None] = lambda: None,
) -> TarballInfo:
    """Save ``tag`` as ``{profile_id}.tar.zst`` atomically, with a sha256 sidecar.

    ``guard`` runs after the data is written and before it is renamed into place; if it
    raises (the lock was lost, say), nothing appears in the cache.
    """
    path = cache_dir / layout.tarball_name(profile_id)
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with atomic_file(path) as fh:
        hashing = HashingWriter(fh)
        with compressor.stream_writer(cast(IO[bytes], hashing), closefd=False) as zw:
            for chunk in _prefetch(engine.save(tag)):
                zw.write(chunk)
        digest, size = hashing.digest.hexdigest(), hashing.size
        guard()
        # The sidecar lands first: the tarball's rename (on leaving this block) is the
        # commit point, and a run under the same profile lock never reads in between.
        atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")
    return TarballInfo(path=str(path), sha256=digest, size=size, compression="zstd")
