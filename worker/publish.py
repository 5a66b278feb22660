"""Publishing a new image for other hosts, after its answer (docs/design.md, "Publishing").

The answer goes out as soon as the image is on the engine; its registry push and its
tarball follow on the worker that built it, and are never lost:

- the *record* ``{publish_dir}/{profile_id}.json`` (in the worker's state folder, which
  no repository can write) says what to publish (the image id, its tag, the cache folder,
  the fence, the manifest to bring up to date) and each publication's state, ``pending``
  until it is ``done`` or ``failed``. It is written, durably, before the answer;
- the *lock* (``flock`` on ``{publish_dir}/{profile_id}.lock``) is held by whoever
  publishes, from before the record says ``pending`` until the last publication has
  finished: a thread of the worker, or a process of its own (:func:`spawn_detached`)
  that inherits the very lock, so the record never says ``pending`` while nobody holds
  it. The kernel drops the lock with its holder, however it dies;
- a record with a pending publication whose lock is free was left by a publisher that
  died: the next job of the profile that finds the same image on this engine (a hit
  too), or a worker's sweep, takes the lock and publishes again (:func:`claim`).

A tarball is committed as the cache always commits one (a temporary name, fsync, the
lock's guard, rename, then the sidecar), so a publisher killed mid-save leaves no torn
tarball: only a temporary file, which the next run of the profile sweeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from pydantic import BaseModel, ValidationError

from pfbuild.client.errors import BadRequest, EngineError, RegistryFailed, StorageError
from pfbuild.client.inputs import read_bounded
from pfbuild.client.models import (
    Manifest,
    Publication,
    PublishKind,
    RegistryInfo,
    TarballInfo,
)
from pfbuild.client.settings import Settings, code_of
from pfbuild.worker import layout
from pfbuild.worker.artifacts import atomic_write_text
from pfbuild.worker.caches import registry, tarball
from pfbuild.worker.caches.trust import TrustStore
from pfbuild.worker.engine import Engine, engine_from_settings

__all__ = [
    "Pending",
    "PublishLock",
    "PublishRecord",
    "PublishSpec",
    "Report",
    "adopt",
    "begin",
    "claim",
    "current",
    "describe",
    "lock_of",
    "nice_this_thread",
    "observe",
    "publish",
    "record_path",
    "spawn_detached",
]

log = logging.getLogger(__name__)

_RECORD_MAX_BYTES = 1024 * 1024
_MANIFEST_MAX_BYTES = 4 * 1024 * 1024
# what a publisher in a process of its own needs of the worker's settings
_SETTINGS_KEPT = (
    "registry",
    "image_repository",
    "zstd_level",
    "zstd_threads",
    "state_dir",
    "tmp_dir",
    "docker_host",
    "docker_timeout",
    "host_id",
)


class PublishSpec(BaseModel):
    """What to publish: one image of one profile, as the build that made it left it."""

    profile_id: str
    image_id: str
    tag: str
    context_sha256: str  # the code's digest: the registry keeps the image under its code tag
    kinds: list[PublishKind]
    cache_dir: str
    fence: int | None = None
    manifest_path: str
    registry_ref: str | None = None
    settings: dict[str, Any]
    created_at: float


class PublishRecord(BaseModel):
    """``{publish_dir}/{profile_id}.json``: the spec and each publication's state."""

    spec: PublishSpec
    publications: dict[PublishKind, Publication]

    @property
    def pending(self) -> bool:
        return any(p.state == "pending" for p in self.publications.values())


class PublishLock:
    """An exclusive ``flock`` on a profile's publish lock file, held by an open fd.

    A child started with the fd (:func:`spawn_detached`) shares the lock: it is released
    when the last holder of the fd closes it, or dies."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd

    def acquire(self, *, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def record_path(settings: Settings, profile_id: str) -> Path:
    return settings.publish_dir() / f"{profile_id}.json"


def lock_of(settings: Settings, profile_id: str) -> PublishLock:
    """The (not yet acquired) publish lock of ``profile_id`` on this host."""
    return PublishLock(settings.publish_dir() / f"{profile_id}.lock")


@dataclass
class Pending:
    """A publication to run, with its publish lock held (released by :meth:`release`)."""

    record: PublishRecord
    lock: PublishLock
    path: Path
    events: list[str] = field(default_factory=list)

    @property
    def spec(self) -> PublishSpec:
        return self.record.spec

    def save(self, *, first: bool = False) -> None:
        """Write the record (durably: it is what makes a publication never lost), unless
        a newer publication of the profile has replaced it meanwhile (this publisher
        stalled past its lock: the newer one's record stays)."""
        if not first:
            on_disk = _read_record(self.path)
            mine = (self.spec.image_id, self.spec.fence)
            if on_disk is not None and (on_disk.spec.image_id, on_disk.spec.fence) != mine:
                log.warning("publication record of %s replaced by a newer one; left as is",
                            self.spec.profile_id)
                return
        atomic_write_text(self.path, self.record.model_dump_json(indent=1) + "\n")

    def refence(self, fence: int | None) -> None:
        """Publish under a new holder's fence (a publication taken over)."""
        spec = self.record.spec
        self.record.spec = spec.model_copy(update={"fence": fence})
        for kind, pub in self.record.publications.items():
            if kind == "tarball" and pub.state == "pending":
                pub.target = str(_tarball_path(self.record.spec))
        self.save(first=True)

    def release(self) -> None:
        self.lock.release()


def _tarball_path(spec: PublishSpec) -> Path:
    return Path(spec.cache_dir) / layout.tarball_name(spec.profile_id, spec.fence)


def current(settings: Settings, profile_id: str) -> PublishRecord | None:
    """The record of the profile's latest publication on this host, if any."""
    return _read_record(record_path(settings, profile_id))


def _read_record(path: Path) -> PublishRecord | None:
    try:
        raw = read_bounded(
            path, what="publication record", limit=_RECORD_MAX_BYTES, follow_symlinks=False
        )
        return PublishRecord.model_validate_json(raw)
    except (BadRequest, ValidationError):
        return None


def begin(
    settings: Settings,
    *,
    profile_id: str,
    image_id: str,
    context_sha256: str,
    kinds: list[PublishKind],
    cache_dir: Path,
    fence: int | None,
    manifest_path: Path,
    lock: PublishLock,
) -> Pending:
    """Record a new image's publications as pending, under ``lock`` (held by the caller)."""
    spec = PublishSpec(
        profile_id=profile_id,
        image_id=image_id,
        tag=settings.image_tag(profile_id),
        context_sha256=context_sha256,
        kinds=kinds,
        cache_dir=str(cache_dir),
        fence=fence,
        manifest_path=str(manifest_path),
        registry_ref=settings.registry_ref(profile_id, code_of(context_sha256)),
        settings=settings.model_dump(mode="json", include=set(_SETTINGS_KEPT)),
        created_at=time.time(),
    )
    targets = {"tarball": str(_tarball_path(spec)), "registry": spec.registry_ref}
    record = PublishRecord(
        spec=spec,
        publications={k: Publication(state="pending", target=targets[k]) for k in kinds},
    )
    pending = Pending(record, lock, record_path(settings, profile_id))
    pending.save(first=True)
    return pending


def adopt(settings: Settings, record: PublishRecord, lock: PublishLock) -> Pending:
    """``record``'s publications, to run under ``lock`` (held by the caller)."""
    return Pending(record, lock, record_path(settings, record.spec.profile_id))


def claim(settings: Settings, record: PublishRecord) -> Pending | None:
    """Take over ``record``'s pending publications if their publisher died (its lock is
    free); None if someone publishes them, or they are finished."""
    if not record.pending:
        return None
    lock = lock_of(settings, record.spec.profile_id)
    if not lock.acquire(blocking=False):
        return None  # its publisher is alive
    found = current(settings, record.spec.profile_id)  # it may have finished meanwhile
    if found is None or not found.pending or found.spec.image_id != record.spec.image_id:
        lock.release()
        return None
    log.warning("publication of %s left pending by a publisher that died; taken over",
                record.spec.profile_id)
    return adopt(settings, found, lock)


# --- running a publication ------------------------------------------------------------

# ``report(kind, publication)``: called as each publication starts and finishes
Report = Callable[[PublishKind, Publication], None]
# called with (kind, publication) as each finishes: the worker's metrics (ops/hooks.py)
_observers: list[Report] = []


def observe(observer: Report) -> None:
    """Call ``observer(kind, publication)`` whenever a publication finishes here (once,
    however often it is asked)."""
    if observer not in _observers:
        _observers.append(observer)


@dataclass
class Outcome:
    """What one publication produced."""

    publication: Publication
    tarball: TarballInfo | None = None
    registry: RegistryInfo | None = None


def publish(
    pending: Pending,
    engine: Engine,
    settings: Settings,
    *,
    guard: Callable[[], None] = lambda: None,
    report: Report = lambda kind, pub: None,
) -> dict[PublishKind, Outcome]:
    """Run ``pending``'s publications still pending, the registry push first (a fraction
    of a second, and what other hosts pull), then the tarball; record each as it ends, in
    the record, the manifest and through ``report``. Raises LockLost when ``guard`` says
    the profile lock is gone (the publication stays pending for the next holder)."""
    outcomes: dict[PublishKind, Outcome] = {}
    spec = pending.spec
    for kind in sorted(pending.record.publications, key=lambda k: k != "registry"):
        if pending.record.publications[kind].state != "pending":
            continue
        report(kind, pending.record.publications[kind])
        started = time.monotonic()
        outcome = _run_one(kind, pending, engine, settings, guard)
        pub = outcome.publication
        pub.seconds = round(time.monotonic() - started, 3)
        pub.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        pending.record.publications[kind] = pub
        pending.save()
        event = describe(kind, pub)
        pending.events.append(event)
        _update_manifest(Path(spec.manifest_path), spec, kind, outcome, event)
        report(kind, pub)
        for observer in _observers:
            with contextlib.suppress(Exception):  # counting never fails a publication
                observer(kind, pub)
        outcomes[kind] = outcome
    return outcomes


def describe(kind: PublishKind, pub: Publication) -> str:
    """One line saying how a publication ended (the manifest's events, the job's log)."""
    what = "tarball save" if kind == "tarball" else "registry push"
    if pub.state == "done":
        return f"{what} done in {pub.seconds:.1f}s: {pub.target}"
    if kind == "tarball":
        return f"tarball not saved (other hosts will build it): {pub.reason}"
    return f"{what} failed after {pub.seconds:.1f}s: {pub.reason}"


def _run_one(
    kind: PublishKind,
    pending: Pending,
    engine: Engine,
    settings: Settings,
    guard: Callable[[], None],
) -> Outcome:
    spec = pending.spec
    target = pending.record.publications[kind].target
    try:
        info = engine.inspect(spec.tag)
        if info is None or info.id != spec.image_id:
            reason = f"{spec.tag} no longer names {spec.image_id} on this engine"
            return Outcome(Publication(state="failed", target=target, reason=reason))
        guard()  # a publisher that lost its lock publishes nothing
        if kind == "registry":
            events: list[str] = []
            pushed = registry.publish(
                engine, settings, spec.profile_id, spec.context_sha256, events
            )
            if pushed is None:
                reason = "; ".join(events) or "the registry refused the push"
                return Outcome(Publication(state="failed", target=target, reason=reason))
            done = Publication(state="done", target=pushed.reference, bytes=pushed.bytes)
            return Outcome(done, registry=pushed)
        saved = tarball.save_tarball(
            engine,
            spec.tag,
            Path(spec.cache_dir),
            spec.profile_id,
            level=settings.zstd_level,
            threads=settings.zstd_threads,
            trust=TrustStore(settings.trust_dir()),
            guard=guard,
            fence=spec.fence,
        )
        return Outcome(Publication(state="done", target=saved.path, bytes=saved.size),
                       tarball=saved)
    except (OSError, requests.RequestException, EngineError, RegistryFailed, StorageError) as exc:
        # a full or read-only disk, an engine that failed: the image stays on this engine
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        log.warning("%s of %s failed: %s", kind, spec.profile_id, reason)
        return Outcome(Publication(state="failed", target=target, reason=reason))


def _update_manifest(
    path: Path, spec: PublishSpec, kind: PublishKind, outcome: Outcome, event: str
) -> None:
    """Bring the manifest of the build up to date, if it still records this image."""
    try:
        raw = read_bounded(path, what="manifest", limit=_MANIFEST_MAX_BYTES,
                           follow_symlinks=False)
        manifest = Manifest.model_validate_json(raw)
    except (BadRequest, ValidationError):
        return  # gone, or no longer ours to update
    if manifest.image_id != spec.image_id or path.parent.is_symlink():
        return
    manifest.publications[kind] = outcome.publication
    if outcome.tarball is not None:
        manifest.tarball = outcome.tarball
    if outcome.registry is not None:
        manifest.registry = outcome.registry
    manifest.events.append(event)
    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")


# --- a publisher in a process of its own ----------------------------------------------


def spawn_detached(pending: Pending, niceness: int = 0) -> int:
    """Start a process that runs ``pending`` and outlives this one (the embedded farm's
    CLI exits once it has its answer); it inherits the publish lock, which this process
    then lets go of. Returns its pid."""
    fd = pending.lock.fd
    if fd is None:
        raise RuntimeError("the publish lock must be held to hand it on")
    logfile = pending.path.with_suffix(".log")
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            ["nice", "-n", str(niceness), sys.executable, "-m", __name__,
             str(pending.path), str(fd)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(fd,),
            start_new_session=True,  # not in the terminal's process group: Ctrl-C spares it
        )
    pending.release()  # the child holds the lock now
    return proc.pid


def _main(argv: list[str]) -> int:
    """``python -m pfbuild.worker.publish RECORD LOCK_FD``: run a record's publications."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path, lock = Path(argv[0]), PublishLock(Path(argv[0]).with_suffix(".lock"), int(argv[1]))
    try:
        record = _read_record(path)
        if record is None:
            log.error("no readable publication record at %s", path)
            return 1
        settings = Settings.model_validate(record.spec.settings)
        done = publish(Pending(record, lock, path), engine_from_settings(settings), settings)
    finally:
        lock.release()
    for kind, outcome in done.items():
        log.info("%s of %s: %s", kind, record.spec.profile_id, outcome.publication.state)
    return 0


def nice_this_thread(niceness: int) -> None:
    """Lower this thread's CPU priority for good (Linux nices threads one by one, and the
    threads it starts, zstd's, inherit it): for a thread that only publishes, then ends."""
    import threading

    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
