"""Publishing after the answer, in the farm (docs/design.md, "Publishing").

A job whose build made a new image hands its publications to its process'
:class:`Publisher`, with the publish lock and the profile's Redis lock it holds; the
publisher runs them once the answer is stored (the task's ``on_success``; at most
``_ANSWER_WAIT`` seconds later whatever happened to it), on a thread of its own at a
lower CPU priority (``publish_niceness``), so no waiter and no worker slot waits for a save:

- the Redis lock stays held (its watchdog renewing it) until the last publication has
  landed: a job of the profile on another host parks on it, is woken by its release and
  finds the image in the registry or the tarball cache; if the publisher dies, the lock
  expires, the sweep wakes the parked job, and it builds;
- each publication's state goes to the job's ``Keys.publications`` hash (what ``pfbuild
  status`` shows) and a line to its log, as it starts and ends;
- a publication a hit found abandoned (its publisher died) takes the Redis lock first,
  and is left to whoever holds it otherwise.

With ``Settings.publish_detached`` (the embedded farm of ``pfbuild submit --wait``), the
publication goes to a process of its own instead, which outlives the command
(:func:`pfbuild.worker.publish.spawn_detached`), and the Redis lock is released at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from pfbuild.client.errors import LockLost
from pfbuild.client.models import Publication, PublishKind
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker import publish
from pfbuild.worker.engine import Engine, engine_from_settings
from pfbuild.worker.farm.lock import ProfileLock
from pfbuild.worker.farm.lockwait import WaitList
from pfbuild.worker.publish import Pending

__all__ = ["Publisher", "start_publish_sweeper", "sweep_publications"]

log = logging.getLogger(__name__)

# seconds a publication waits for its job's answer to be stored before it starts anyway
_ANSWER_WAIT = 2.0
# seconds a worker process that shuts down waits for its publications to land
_SHUTDOWN_WAIT = 120.0


@dataclass
class _Handed:
    """One publication handed on by a job, and the profile lock that goes with it."""

    job_id: str
    pending: Pending
    lock: ProfileLock | None
    answered: threading.Event = field(default_factory=threading.Event)
    once: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False


class Publisher:
    """Runs the publications one worker process' jobs hand on (see the module doc)."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        client: Callable[[], redis.Redis],
        engine: Callable[[], Engine],
    ) -> None:
        self.app = app
        self.settings = settings
        self.client = client
        self.engine = engine
        self._mutex = threading.Lock()
        self._waiting: dict[str, list[_Handed]] = {}
        self._threads: set[threading.Thread] = set()

    def hand(
        self,
        job_id: str,
        handed: list[tuple[Pending, ProfileLock | None]],
        *,
        answered: bool = False,
    ) -> None:
        """Take ``job_id``'s publications; they start once :meth:`answered` says its
        answer is stored (at once with ``answered``)."""
        items = [_Handed(job_id, pending, lock) for pending, lock in handed]
        if not items:
            return
        with self._mutex:
            self._waiting.setdefault(job_id, []).extend(items)
        for item in items:
            self._start_thread(item, wait=0.0 if answered else _ANSWER_WAIT)

    def answered(self, job_id: str) -> None:
        """The job's answer is stored: its publications go."""
        with self._mutex:
            items = self._waiting.pop(job_id, [])
        for item in items:
            if self.settings.publish_detached:
                self._go(item)  # now, before the task ends and the command may exit
            item.answered.set()

    def join(self, timeout: float = _SHUTDOWN_WAIT) -> None:
        """Wait (at most ``timeout`` seconds in all) for the publications running here."""
        for thread in list(self._threads):
            thread.join(timeout)

    def _start_thread(self, item: _Handed, wait: float) -> None:
        def run() -> None:
            item.answered.wait(wait)
            with self._mutex:
                self._waiting.pop(item.job_id, None)
            try:
                self._go(item)
            finally:
                self._threads.discard(threading.current_thread())

        thread = threading.Thread(
            target=run, name=f"pfbuild-publish-{item.pending.spec.profile_id[:12]}"
        )
        self._threads.add(thread)
        thread.start()

    def _go(self, item: _Handed) -> None:
        with item.once:
            if item.started:
                return
            item.started = True
        if self.settings.publish_detached:
            pid = publish.spawn_detached(item.pending, self.settings.publish_niceness)
            log.info("job %s: publishing %s in process %d", item.job_id,
                     item.pending.spec.profile_id, pid)
            if item.lock is not None:
                self._release(item.lock)
            return
        publish.nice_this_thread(self.settings.publish_niceness)
        self.run(item.job_id, item.pending, item.lock)

    def run(self, job_id: str, pending: Pending, lock: ProfileLock | None) -> None:
        """Publish ``pending`` here and now, under the profile's Redis lock (``lock``,
        held by the caller, or taken here: if someone else holds it, they publish)."""
        try:
            if lock is None:
                lock = ProfileLock(self.client(), pending.spec.profile_id,
                                   ttl=self.settings.lock_ttl, owner=f"{job_id}:publisher")
                if not lock.acquire():
                    lock = None
                    return
                pending.refence(lock.fence)
            with lock.watchdog():
                publish.publish(pending, self.engine(), self.settings, guard=lock.check,
                                report=self._reporter(job_id, pending))
        except LockLost as exc:
            log.warning("job %s: publication of %s stopped: %s", job_id,
                        pending.spec.profile_id, exc.message)
        except Exception:
            log.exception("job %s: publication of %s failed", job_id, pending.spec.profile_id)
        finally:
            pending.release()  # before the Redis lock: its next holder may take it at once
            if lock is not None:
                self._release(lock)

    def _release(self, lock: ProfileLock) -> None:
        """Release the profile lock and send again the jobs parked on it."""
        lock.release()
        try:
            WaitList(self.client(), self.app, lock.profile_id).wake()
        except (redis.RedisError, OperationalError) as exc:
            log.warning("could not wake the jobs waiting for %s: %s", lock.profile_id, exc)

    def _reporter(self, job_id: str, pending: Pending) -> publish.Report:
        """Every publication's state into the job's hash (all of them at each change, so
        the hash never shows one without the others), and a line into its log."""
        ttl = self.settings.result_expires

        def report(kind: PublishKind, pub: Publication) -> None:
            states: dict[str, str] = {
                k: p.model_dump_json() for k, p in pending.record.publications.items()
            }
            states[kind] = pub.model_dump_json()
            try:
                pipe = self.client().pipeline(transaction=False)
                for name, state in states.items():
                    pipe.hset(Keys.publications(job_id), name, state)
                if pub.state != "pending":
                    pipe.rpush(Keys.log(job_id), f"[pfbuild] {publish.describe(kind, pub)}")
                if ttl:
                    pipe.expire(Keys.publications(job_id), ttl)
                    pipe.expire(Keys.log(job_id), ttl)
                pipe.execute()
            except redis.RedisError as exc:  # what it records is best effort, not the save
                log.warning("job %s: could not record the %s publication: %s", job_id, kind, exc)

        return report


def sweep_publications(settings: Settings, engine: Engine, publisher: Publisher) -> int:
    """Finish the publications of this host that a publisher left pending when it died,
    of images still on this engine; returns how many were taken over."""
    taken = 0
    folder = settings.publish_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = publish.current(settings, path.stem)
        if record is None or not record.pending:
            continue
        info = engine.inspect(record.spec.tag)
        if info is None or info.id != record.spec.image_id:
            continue  # the image is gone or replaced: a later build publishes its own
        pending = publish.claim(settings, record)
        if pending is not None:
            publisher.run("sweep", pending, None)
            taken += 1
    return taken


def start_publish_sweeper(
    app: Celery, settings: Settings, stop: threading.Event
) -> threading.Thread | None:
    """In a worker's main process: sweep every ``publish_sweep_seconds`` in a daemon
    thread until ``stop`` is set (not with detached publishers: no worker outlives them)."""
    if settings.publish_sweep_seconds <= 0 or settings.publish_detached:
        return None
    made: dict[str, Any] = {}

    def client() -> redis.Redis:
        if "redis" not in made:
            made["redis"] = redis.Redis.from_url(
                app.conf.broker_url, socket_timeout=settings.worker_redis_socket_timeout
            )
        return made["redis"]  # type: ignore[no-any-return]

    def engine() -> Engine:
        if "engine" not in made:
            made["engine"] = engine_from_settings(settings)
        return made["engine"]  # type: ignore[no-any-return]

    publisher = Publisher(app, settings, client, engine)

    def loop() -> None:
        while not stop.wait(settings.publish_sweep_seconds):
            try:
                if taken := sweep_publications(settings, engine(), publisher):
                    log.info("took over %d publication(s) left pending", taken)
            except Exception as exc:  # an engine or disk blip: try again next time
                log.warning("publication sweep failed: %s", exc)

    thread = threading.Thread(target=loop, name="pfbuild-publish-sweeper", daemon=True)
    thread.start()
    return thread
