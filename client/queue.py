"""What client and workers share about the queue: task names, Redis keys, how a Celery
state reads as a :class:`JobState`, and the Celery app's common part (broker, result
backend, JSON). The worker's own settings (acks, prefetch, time limits) live in
``pfbuild.worker.celery_app``. Imports celery and redis only (no docker SDK)."""

from __future__ import annotations

import hashlib
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend

from pfbuild.client.models import JobState
from pfbuild.client.redisconn import canonical_url, is_sentinel, transport_options
from pfbuild.client.settings import Settings

__all__ = [
    "PING_TASK",
    "QUEUE",
    "SIGNAL_DONE_LUA",
    "TASK_NAME",
    "JobState",
    "Keys",
    "PollingRedisBackend",
    "PollingSentinelBackend",
    "claim_flight",
    "claim_flight_command",
    "end_flight",
    "flight_holder",
    "job_state",
    "make_celery",
    "mark_sent",
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

    @staticmethod
    def job(job_id: str) -> str:
        """The job's record: it exists from the moment its flight is claimed (for
        ``send_grace`` until it is sent, then until it is answered and the answer expires).
        No record and no answer: the job is lost (docs/design.md, "Job life")."""
        return f"pfbuild:job:{job_id}"

    @staticmethod
    def publications(job_id: str) -> str:
        """Hash: publication kind -> JSON :class:`Publication` of the image the job built,
        kept up to date by the publisher after the answer (``pfbuild status`` reads it)."""
        return f"pfbuild:publications:{job_id}"

    @staticmethod
    def waiters(profile_id: str) -> str:
        """The jobs parked on a profile's lock: job id → its message's arguments."""
        return f"pfbuild:waiters:{profile_id}"

    @staticmethod
    def waiting() -> str:
        """The profiles that have parked jobs (what each worker's sweeper looks at)."""
        return "pfbuild:waiting"

    @staticmethod
    def alive(job_id: str) -> str:
        """The heartbeat of the one delivery running the job: its token, short TTL."""
        return f"pfbuild:alive:{job_id}"
    # --- operating the farm (docs/design.md, "Operating the farm") ----------------------
    @staticmethod
    def running() -> str:
        """Hash: job id -> JSON (profile, host, worker, since) of each job in a slot."""
        return "pfbuild:running"

    @staticmethod
    def failures() -> str:
        """List, newest first and capped: the farm's recent failures."""
        return "pfbuild:failures"

    @staticmethod
    def stats() -> str:
        """Hash of counters: answers by cache source, failures by class."""
        return "pfbuild:stats"

    @staticmethod
    def uses(host_id: str) -> str:
        """Sorted set: profile id -> when a job last used its image on ``host_id``."""
        return f"pfbuild:uses:{host_id}"

    @staticmethod
    def gc_report(host_id: str) -> str:
        """JSON: what ``host_id``'s last garbage collection found and removed."""
        return f"pfbuild:gc:{host_id}"

    @staticmethod
    def gc_lock(host_id: str) -> str:
        """One collection at a time per host, however many workers it runs."""
        return f"pfbuild:gc-lock:{host_id}"


_DELETE_IF_VALUE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


# Claim a flight and create the job's record in one step, or name the job already flying.
# KEYS: flight, job record; ARGV: job id, flight TTL, seconds the submitter has to send.
_CLAIM_FLIGHT = """
local current = redis.call('get', KEYS[1])
if current then return current end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('set', KEYS[2], 'claimed', 'PX', ARGV[3])
return false
"""


def claim_flight(
    client: redis.Redis, flight_key: str, job_id: str, settings: Settings
) -> str | None:
    """Make ``job_id`` the flight at ``flight_key`` and record it, atomically; or return
    the id of the job that already holds the flight.

    The record lives ``send_grace`` seconds: a submitter killed before its send leaves a
    flight whose job record soon expires, and the next submit starts afresh.
    """
    return flight_holder(client.eval(*claim_flight_command(flight_key, job_id, settings)))


def claim_flight_command(flight_key: str, job_id: str, settings: Settings) -> tuple[Any, ...]:
    """:func:`claim_flight` as arguments of ``eval``, to send in a pipeline of one's own;
    :func:`flight_holder` reads its reply."""
    return (
        _CLAIM_FLIGHT,
        2,
        flight_key,
        Keys.job(job_id),
        job_id,
        settings.flight_ttl,
        int(settings.send_grace * 1000),
    )


def flight_holder(reply: Any) -> str | None:
    """The job that already held the flight, from a claim's reply; None if it is ours."""
    if reply is None:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def mark_sent(client: redis.Redis, job_id: str, settings: Settings) -> None:
    """The job's message is on the queue: its record now lives as long as a flight."""
    client.set(Keys.job(job_id), "sent", ex=settings.flight_ttl)


def end_flight(client: redis.Redis, flight_key: str, job_id: str) -> bool:
    """End the single flight at ``flight_key`` if (and only if) it still names ``job_id``.

    Atomic in Redis: a job ends its own flight, never a newer one that replaced it.
    """
    return bool(client.eval(_DELETE_IF_VALUE, 1, flight_key, job_id))


# Wake a job's waiters, end its flight if it still names the job, keep its record as long
# as its answer. KEYS: flight ('' for none), done list, job record; ARGV: job id, TTL.
# The worker's result store runs the same lines after the result (worker/farm/results.py).
SIGNAL_DONE_LUA = """
if KEYS[1] ~= '' and redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
redis.call('rpush', KEYS[2], 1)
redis.call('ltrim', KEYS[2], 0, 0)
redis.call('expire', KEYS[2], ARGV[2])
redis.call('expire', KEYS[3], ARGV[2])
"""
_SIGNAL_DONE = SIGNAL_DONE_LUA + "return 1\n"


def signal_done(client: redis.Redis, job_id: str, ttl: int, flight_key: str | None = None) -> None:
    """Wake whoever waits for ``job_id``: its result (or revocation) is stored. Ends its
    flight too, if given and still its own, and keeps the job's record as long as its
    answer (then the job is gone for good): one round trip at the end of every job."""
    client.eval(
        _SIGNAL_DONE, 3, flight_key or "", Keys.done(job_id), Keys.job(job_id), job_id, ttl
    )


class PollingRedisBackend(RedisBackend):  # type: ignore[misc]
    """The Redis result backend, minus the per-task subscription at send time.

    Celery's Redis backend SUBSCRIBEs to a channel for every task sent, and never lets go
    of it unless ``.get()`` is called (celery#5320): a client sending thousands of jobs
    leaks thousands of subscriptions. pfbuild's clients poll the result key instead.
    """

    def on_task_call(self, producer: object, task_id: str) -> None:
        pass


class PollingSentinelBackend(PollingRedisBackend, SentinelBackend):  # type: ignore[misc]
    """:class:`PollingRedisBackend` over Sentinel: Celery's ``SentinelBackend`` reads the
    ``sentinel://`` URL and asks the Sentinels for the master's pool
    (``result_backend_transport_options``: ``master_name``); the rest is unchanged."""


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def make_celery(
    settings: Settings,
    redis_url: str,
    *,
    name: str = "pfbuild",
    socket_timeout: float | None = None,
    backend: type = PollingRedisBackend,
    sentinel_backend: type = PollingSentinelBackend,
) -> Celery:
    """The part of the Celery app both sides share: Redis broker and backend, JSON only.

    ``backend`` is the result backend's class (the worker's stores results its own way),
    ``sentinel_backend`` its twin for a ``sentinel://`` URL (client/redisconn.py), whose
    broker and backend are also told the master's name. ``socket_timeout`` bounds each
    result-backend call (a client's reads), so a Redis that accepts but never answers is an
    error in seconds, not a hang."""
    url = canonical_url(redis_url)
    sentinel = is_sentinel(url)
    cls = sentinel_backend if sentinel else backend
    app = Celery(name, broker=url, backend=f"{_path(cls)}+{url}")
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
        redis_socket_timeout=socket_timeout,
        redis_socket_connect_timeout=socket_timeout,
    )
    if sentinel:
        options = transport_options(url, settings, socket_timeout)
        app.conf.update(
            broker_transport_options=dict(options),
            # a result stored during a promotion is retried until the new master answers,
            # for as long as a client waits through an outage
            result_backend_transport_options={
                **options,
                "retry_policy": {
                    "max_retries": max(1, int(settings.redis_outage_tolerance)),
                    "interval_start": 0,
                    "interval_step": 1,
                    "interval_max": 1,
                },
            },
        )
    return app
