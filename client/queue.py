"""What client and workers share about the queue: the Celery app, task name, Redis keys
and the states a job goes through. Imports celery and redis only (no docker SDK)."""

from __future__ import annotations

from enum import Enum

import redis
from celery import Celery
from celery.backends.redis import RedisBackend

from pfbuild.client.settings import Settings

__all__ = [
    "PING_TASK",
    "TASK_NAME",
    "JobState",
    "Keys",
    "PollingRedisBackend",
    "celery_state",
    "delete_if_value",
    "job_state",
    "make_celery",
]

TASK_NAME = "pfbuild.build"
PING_TASK = "pfbuild.ping"
QUEUE = "pfbuild"


class JobState(str, Enum):
    """What a client sees of a job, in the order a build goes through them."""

    QUEUED = "queued"
    WAITING_FOR_LOCK = "waiting_for_lock"
    RENDERING = "rendering"
    CHECKING_CACHE = "checking_cache"
    PULLING_IMAGE = "pulling_image"
    LOADING_TARBALL = "loading_tarball"
    BUILDING = "building"
    SAVING_TARBALL = "saving_tarball"
    PUSHING_IMAGE = "pushing_image"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"

    @property
    def ready(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED)


_FROM_CELERY = {
    "PENDING": JobState.QUEUED,
    "RECEIVED": JobState.QUEUED,
    "STARTED": JobState.QUEUED,
    "RETRY": JobState.WAITING_FOR_LOCK,
    "SUCCESS": JobState.SUCCESS,
    "FAILURE": JobState.FAILURE,
    "REVOKED": JobState.CANCELLED,
}


def celery_state(state: JobState) -> str:
    """The custom Celery state a worker publishes for a stage (``BUILDING``, ...)."""
    return state.value.upper()


def job_state(celery: str) -> JobState:
    """Map a Celery state (built-in or ours) to a JobState."""
    if celery in _FROM_CELERY:
        return _FROM_CELERY[celery]
    try:
        return JobState(celery.lower())
    except ValueError:
        return JobState.QUEUED


class Keys:
    """Redis key names; every pfbuild key starts with ``pfbuild:``."""

    @staticmethod
    def flight(profile_id: str, forced: bool) -> str:
        return f"pfbuild:flight:{'force' if forced else 'build'}:{profile_id}"

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


_DELETE_IF_VALUE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def delete_if_value(client: redis.Redis, key: str, value: str) -> bool:
    """Delete ``key`` only if it still holds ``value`` (atomically, in Redis): a flight
    key is ended only by the job it names, never a newer one."""
    return bool(client.eval(_DELETE_IF_VALUE, 1, key, value))


class PollingRedisBackend(RedisBackend):  # type: ignore[misc]
    """The Redis result backend, minus the per-task subscription at send time.

    Celery's Redis backend SUBSCRIBEs to a channel for every task sent, and never lets go
    of it unless ``.get()`` is called (celery#5320): a client sending thousands of jobs
    leaks thousands of subscriptions. pfbuild's clients poll the result key instead.
    """

    def on_task_call(self, producer: object, task_id: str) -> None:
        pass


def make_celery(
    settings: Settings, redis_url: str | None = None, *, name: str = "pfbuild"
) -> Celery:
    """The Celery app both sides use: Redis broker and backend, JSON only."""
    url = redis_url or settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery(name, broker=url, backend=f"{__name__}.PollingRedisBackend+{url}")
    app.conf.update(
        # JSON only: a worker never unpickles what a client sent, and vice versa.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        # Ack after the build, not before: a worker that dies mid-build leaves its job
        # in Redis' unacked set, from which another worker gets it back.
        task_acks_late=True,
        # A pool process killed under a job (OOM, SIGKILL) requeues the job rather than
        # failing it; the task caps how often (Settings.max_deliveries).
        task_reject_on_worker_lost=True,
        # One job reserved per process: a build takes minutes, and a job prefetched by a
        # busy worker would wait behind it while another worker sits idle.
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked job after visibility_timeout; it must outlast the
        # hard time limit or a long build runs twice (celery#5935).
        # Workers sweep for such orphans every 10 s (kombu's default scans only every
        # 10th sweep, so a dead worker's job would wait up to 100 s more).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        # The soft limit raises inside the build so it releases its lock and reports a
        # structured timeout; the hard limit kills what ignores it.
        task_soft_time_limit=settings.build_soft_time_limit,
        task_time_limit=settings.build_time_limit,
        # If the broker connection drops, cancel running builds: their acks would be lost
        # anyway and the jobs redelivered, so finishing them would only build twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Say explicitly that a worker started before Redis keeps retrying to connect.
        broker_connection_retry_on_startup=True,
        result_expires=settings.result_expires,
        # No STARTED: the task publishes its own stages, and a STARTED stored by each lock
        # retry would send a waiting job's state backwards.
        task_track_started=False,
        result_extended=True,
        worker_hijack_root_logger=False,
    )
    return app
