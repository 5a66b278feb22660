"""A running job's heartbeat, and what a redelivered copy of a job does.

While a delivery runs a job it holds ``Keys.alive(job)`` (its token, a short TTL) and a
thread renews it every ``job_heartbeat_seconds``; the same beat keeps the job's record alive
and moves the job's deliveries to *now* in the broker's unacked index, so the broker never
hands a running job to another worker however long it builds. A dead host stops beating:
its delivery comes back after ``visibility_timeout``.

The same thread looks for the job's cancel flag twice a second and, when it is set,
stops the engine's build (``on_cancel``): cancelling never depends on the worker pool
killing a process.

A copy that starts (a redelivery, or a duplicate of a reserved message) looks first:
its answer is stored → it acknowledges itself and stores nothing; another delivery beats
→ it steps aside if another message of the job is still on the broker, or else (it is the
last one) it waits, beating for its own message, until that run answers or stops beating.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import redis
from celery import Celery

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings

__all__ = ["Heartbeat", "Unacked", "job_deliveries"]

# how often a running job looks for its cancel flag: a cancelled build stops within this
# (plus the engine's own stop), in every worker pool
_CANCEL_POLL = 0.5

_RELEASE_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Unacked:
    """Where kombu's Redis transport keeps unacknowledged deliveries, per ``app``."""

    def __init__(self, app: Celery) -> None:
        options = app.conf.broker_transport_options or {}
        prefix = str(options.get("global_keyprefix", ""))
        self.key = prefix + str(options.get("unacked_key", "unacked"))
        self.index_key = prefix + str(options.get("unacked_index_key", "unacked_index"))


def job_deliveries(client: redis.Redis, unacked: Unacked, job_id: str) -> list[bytes]:
    """Delivery tags of the unacknowledged messages of ``job_id`` (a handful at most)."""
    tags = []
    for tag, raw in client.hscan_iter(unacked.key):
        try:
            message = json.loads(raw)[0]
            if message.get("headers", {}).get("id") == job_id:
                tags.append(tag)
        except (ValueError, LookupError, TypeError, AttributeError):
            continue
    return tags


class Heartbeat:
    """The heartbeat of one delivery of one job."""

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        settings: Settings,
        job_id: str,
        owner: str,
        on_cancel: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.on_cancel = on_cancel
        self.settings = settings
        self.job_id = job_id
        self.unacked = Unacked(app)
        self.token = f"{owner}:{uuid.uuid4().hex}"
        self.key = Keys.alive(job_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> str | None:
        """Start beating for the job; return the holder's token if another delivery beats."""
        ttl = int(self.settings.job_heartbeat_ttl * 1000)
        if self.client.set(self.key, self.token, nx=True, px=ttl):
            # the record may have expired with a slow send: the job exists while it runs
            self.client.set(Keys.job(self.job_id), "running", ex=self.settings.flight_ttl)
            return None
        holder = self.client.get(self.key)
        if holder is None:
            return self.claim()
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        return None if text == self.token else text

    def beat(self) -> None:
        """Renew: our heartbeat, the job's record, and the job's deliveries' visibility."""
        tags = job_deliveries(self.client, self.unacked, self.job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, self.token, px=int(self.settings.job_heartbeat_ttl * 1000))
        # EXPIRE, not SET: a record wiped with Redis stays wiped, so waiters learn of it
        pipe.expire(Keys.job(self.job_id), self.settings.flight_ttl)
        if tags:
            pipe.zadd(self.unacked.index_key, dict.fromkeys(tags, time.time()), xx=True)
        pipe.execute()

    def keep_visible(self) -> None:
        """Only move the job's deliveries to *now* (while another delivery beats)."""
        tags = job_deliveries(self.client, self.unacked, self.job_id)
        if tags:
            self.client.zadd(self.unacked.index_key, dict.fromkeys(tags, time.time()), xx=True)

    def others_on_broker(self) -> bool:
        """True if more than one message of the job is unacknowledged: ours and another."""
        return len(job_deliveries(self.client, self.unacked, self.job_id)) > 1

    def pause(self) -> None:
        """Stop beating at once, leaving the heartbeat key as it is."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def resume(self) -> None:
        """Beat every ``job_heartbeat_seconds`` (again), starting now; between beats, look for
        the job's cancel flag every ``_CANCEL_POLL`` seconds and call ``on_cancel`` once."""

        def loop(stop: threading.Event) -> None:
            next_beat = time.monotonic() + self.settings.job_heartbeat_seconds
            cancelled = False
            while not stop.wait(min(_CANCEL_POLL, self.settings.job_heartbeat_seconds)):
                with contextlib.suppress(redis.RedisError):  # a blip: try again later
                    if not cancelled and self.client.exists(Keys.cancel(self.job_id)):
                        cancelled = True
                        self.on_cancel()
                    if time.monotonic() >= next_beat:
                        self.beat()
                        next_beat = time.monotonic() + self.settings.job_heartbeat_seconds

        with contextlib.suppress(redis.RedisError):
            self.beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=loop, args=(self._stop,), name=f"beat-{self.job_id[:8]}", daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Stop beating and free the heartbeat if it is still ours."""
        self.pause()
        with contextlib.suppress(redis.RedisError):
            self.client.eval(_RELEASE_IF_OURS, 1, self.key, self.token)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Beat while the body runs; release at the end."""
        self.resume()
        try:
            yield
        finally:
            self.release()
