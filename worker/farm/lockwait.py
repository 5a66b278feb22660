"""Waiting for a profile lock without holding a delivery: a per-profile wait list.

A job whose profile is locked *parks*: its message's arguments go into the profile's
wait list (atomically with a check that the lock is still held, and with the end of its
heartbeat), and its delivery is acknowledged. Nothing of it is on the broker while it
waits, so no visibility clock runs and no ETA message inflates a worker's prefetch.

The lock's release *wakes* the list: each parked job is sent again (same job id) and
races for the lock; a loser parks again. A holder that died releases nothing, so every
worker sweeps (``lock_poll_seconds``) the profiles with parked jobs: a list whose lock is
gone is woken, and so is a job parked past ``lock_wait_max`` (it then fails with
LockWaitExceeded). A job is sent before its entry is removed (and only the entry it sent),
so a crash between the two sends it twice, which a copy survives (worker/farm/liveness.py);
it is never lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from pfbuild.client.queue import TASK_NAME, Keys
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings

__all__ = ["WaitList", "start_sweeper", "sweep"]

log = logging.getLogger(__name__)

# KEYS: lock, wait list, index of waiting profiles, the job's heartbeat
# ARGV: job id, entry, profile id, heartbeat token
_PARK = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
redis.call('sadd', KEYS[3], ARGV[3])
if redis.call('get', KEYS[4]) == ARGV[4] then redis.call('del', KEYS[4]) end
return 1
"""

# KEYS: wait list, index; ARGV: job id, the entry that was sent, profile id
_UNPARK = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('hdel', KEYS[1], ARGV[1]) end
if redis.call('hlen', KEYS[1]) == 0 then redis.call('srem', KEYS[2], ARGV[3]) end
return 1
"""


class WaitList:
    """The jobs parked on one profile's lock."""

    def __init__(self, client: redis.Redis, app: Celery, profile_id: str) -> None:
        self.client = client
        self.app = app
        self.profile_id = profile_id
        self.key = Keys.waiters(profile_id)

    def park(
        self, job_id: str, kwargs: dict[str, Any], beat_token: str, queue: str | None = None
    ) -> bool:
        """Park the job if the lock is still held (and drop its heartbeat); False if the
        lock was freed meanwhile: then take it instead. ``queue``: where it came from, and
        where a wake-up sends it again."""
        entry = json.dumps(
            {"kwargs": kwargs, "queue": queue, "parked": uuid.uuid4().hex, "at": time.time()}
        )
        keys = [Keys.lock(self.profile_id), self.key, Keys.waiting(), Keys.alive(job_id)]
        return bool(self.client.eval(_PARK, 4, *keys, job_id, entry, self.profile_id,
                                     beat_token))

    def wake(self, only_parked_before: float | None = None) -> int:
        """Send the parked jobs again (those parked before a time, if given)."""
        woken = 0
        for raw_id, entry in self.client.hgetall(self.key).items():
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            try:
                parked = json.loads(entry)
                since = parked["kwargs"].get("lock_wait_since") or parked["at"]
                if only_parked_before is not None and since >= only_parked_before:
                    continue
                self.app.send_task(
                    TASK_NAME, kwargs=parked["kwargs"], task_id=job_id, queue=parked.get("queue")
                )
            except (ValueError, LookupError, TypeError):
                log.warning("dropping an unreadable wait-list entry of job %s", job_id)
            self.client.eval(_UNPARK, 2, self.key, Keys.waiting(), job_id, entry, self.profile_id)
            woken += 1
        return woken


def sweep(client: redis.Redis, app: Celery, settings: Settings) -> int:
    """Wake the parked jobs whose lock is gone, and those waiting past lock_wait_max."""
    woken = 0
    for raw in client.smembers(Keys.waiting()):
        profile_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        waits = WaitList(client, app, profile_id)
        if not client.exists(Keys.lock(profile_id)):
            woken += waits.wake()
        else:
            woken += waits.wake(only_parked_before=time.time() - settings.lock_wait_max)
    return woken


def start_sweeper(app: Celery, settings: Settings, stop: threading.Event) -> threading.Thread:
    """Sweep every ``lock_poll_seconds`` in a daemon thread until ``stop`` is set."""
    client = connect(
        app.conf.broker_url, settings, socket_timeout=settings.worker_redis_socket_timeout
    )

    def loop() -> None:
        while not stop.wait(settings.lock_poll_seconds):
            with contextlib.suppress(redis.RedisError, OSError, OperationalError):
                if woken := sweep(client, app, settings):
                    log.info("woke %d job(s) parked on a free or overdue lock", woken)

    thread = threading.Thread(target=loop, name="pfbuild-lock-sweeper", daemon=True)
    thread.start()
    return thread
