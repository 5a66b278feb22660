"""What client and workers share about the queue: task names, Redis keys, how a Celery
state reads as a :class:`JobState`, and the Celery app's common part (broker, result
backend, JSON). The worker's own settings (acks, prefetch, time limits) live in
``pfbuild.worker.celery_app``. Imports celery and redis only (no docker SDK)."""

from __future__ import annotations

import hashlib

import redis
from celery import Celery
from celery.backends.redis import RedisBackend

from pfbuild.client.models import JobState
from pfbuild.client.settings import Settings

__all__ = [
    "PING_TASK",
    "QUEUE",
    "TASK_NAME",
    "JobState",
    "Keys",
    "PollingRedisBackend",
    "end_flight",
    "job_state",
    "make_celery",
    "signal_done",
]

TASK_NAME = "pfbuild.build"
PING_TASK = "pfbuild.ping"
QUEUE = "pfbuild"

_FROM_CELERY = {
    "PENDING": JobState.QUEUED,
    "RECEIVED": JobState.QUEUED,
    "STARTED": JobState.QUEUED,
    "RETRY": JobState.WAITING_FOR_LOCK,
    "SUCCESS": JobState.SUCCESS,
    "FAILURE": JobState.FAILURE,
    "REVOKED": JobState.CANCELLED,
}


def job_state(celery: str) -> JobState:
    """Map a Celery state (built-in, or one of :attr:`JobState.celery_state`) to a JobState."""
    if celery in _FROM_CELERY:
        return _FROM_CELERY[celery]
    try:
        return JobState(celery.lower())
    except ValueError:
        return JobState.QUEUED


class Keys:
    """Redis key names; every pfbuild key starts with ``pfbuild:``."""

    @staticmethod
    def flight(profile_id: str, forced: bool, repo_dir: str) -> str:
        """One flight per profile, repository and ``force_rebuild``: requests join one
        job only when they would build the same thing (docs/design.md, "Single flight")."""
        repo = hashlib.sha256(repo_dir.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"pfbuild:flight:{'force' if forced else 'build'}:{profile_id}:{repo}"

    @staticmethod
    def log(job_id: str) -> str:
        return f"pfbuild:log:{job_id}"

    @staticmethod
    def lock(profile_id: str) -> str:
        return f"pfbuild:lock:{profile_id}"

    @staticmethod
    def fence(profile_id: str) -> str:
        return f"pfbuild:fence:{profile_id}"

    @staticmethod
    def cancel(job_id: str) -> str:
        return f"pfbuild:cancel:{job_id}"

    @staticmethod
    def starts(job_id: str) -> str:
        return f"pfbuild:starts:{job_id}"

    @staticmethod
    def done(job_id: str) -> str:
        return f"pfbuild:done:{job_id}"


_DELETE_IF_VALUE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def end_flight(client: redis.Redis, flight_key: str, job_id: str) -> bool:
    """End the single flight at ``flight_key`` if (and only if) it still names ``job_id``.

    Atomic in Redis: a job ends its own flight, never a newer one that replaced it.
    """
    return bool(client.eval(_DELETE_IF_VALUE, 1, flight_key, job_id))


_SIGNAL_DONE = """
if KEYS[1] ~= '' and redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
redis.call('rpush', KEYS[2], 1)
redis.call('ltrim', KEYS[2], 0, 0)
redis.call('expire', KEYS[2], ARGV[2])
return 1
"""


def signal_done(client: redis.Redis, job_id: str, ttl: int, flight_key: str | None = None) -> None:
    """Wake whoever waits for ``job_id``: its result (or revocation) is stored. Ends its
    flight too, if given and still its own: one round trip at the end of every job."""
    client.eval(_SIGNAL_DONE, 2, flight_key or "", Keys.done(job_id), job_id, ttl)


class PollingRedisBackend(RedisBackend):  # type: ignore[misc]
    """The Redis result backend, minus the per-task subscription at send time.

    Celery's Redis backend SUBSCRIBEs to a channel for every task sent, and never lets go
    of it unless ``.get()`` is called (celery#5320): a client sending thousands of jobs
    leaks thousands of subscriptions. pfbuild's clients poll the result key instead.
    """

    def on_task_call(self, producer: object, task_id: str) -> None:
        pass


def make_celery(settings: Settings, redis_url: str, *, name: str = "pfbuild") -> Celery:
    """The part of the Celery app both sides share: Redis broker and backend, JSON only."""
    app = Celery(name, broker=redis_url, backend=f"{__name__}.PollingRedisBackend+{redis_url}")
    app.conf.update(
        # JSON only: a worker never unpickles what a client sent, and vice versa.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        result_expires=settings.result_expires,
        # no request copy in each result: a hit's result is written and read on the hot path
        result_extended=False,
    )
    return app
