"""The Celery task: a thin shell that runs the pipeline under the profile lock.

It publishes the job's state as it goes (queued → waiting for the lock → rendering →
checking the cache → loading the tarball → building ``i/n`` → saving the tarball), streams
log lines to a Redis list that late joiners read from the start, and ends in success with
the answer or in failure with a structured, JSON-serialised :class:`PfbuildError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from pfbuild.client.errors import BadRequest, BuildTimeout, LockLost, PfbuildError
from pfbuild.client.models import Timings
from pfbuild.client.profile import validate_request
from pfbuild.client.queue import (
    PING_TASK,
    TASK_NAME,
    JobState,
    Keys,
    celery_state,
    delete_if_value,
)
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import DockerEngine, Engine
from pfbuild.worker.lock import ProfileLock
from pfbuild.worker.pipeline import resolve_request, run_build

__all__ = ["Reporter", "register"]

log = logging.getLogger(__name__)

_LOG_KEEP = 50_000  # lines kept per job in Redis; the full log is in build.log
_PUBLISH_EVERY = 0.5  # seconds between two state updates within one stage


class Reporter:
    """Publishes stage changes at once, progress within a stage at most every 0.5 s."""

    def __init__(
        self,
        task: Task,
        client: redis.Redis,
        job_id: str,
        base: dict[str, Any],
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.task = task
        self.client = client
        self.job_id = job_id
        self.base = base
        self.check = check
        self.stage: str | None = None
        self.last_publish = 0.0
        self.lines: list[str] = []
        self.meta: dict[str, Any] = {}

    def __call__(self, stage: str, **info: Any) -> None:
        self.check()  # a build whose lock is gone stops at its next line
        if "line" in info:
            self.lines.append(str(info["line"]))
        now = time.monotonic()
        if stage != self.stage or now - self.last_publish >= _PUBLISH_EVERY:
            self.publish(stage, **info)

    def publish(self, stage: str, **info: Any) -> None:
        self.stage = stage
        self.last_publish = time.monotonic()
        self.flush()
        self.meta = {
            **self.base,
            "stage": stage,
            **{k: v for k, v in info.items() if v is not None},
        }
        try:
            self.task.update_state(state=celery_state(JobState(stage)), meta=self.meta)
        except (redis.RedisError, OperationalError) as exc:
            # progress is best effort: a Redis blip must not fail the build itself
            log.warning("job %s: could not publish stage %s: %s", self.job_id, stage, exc)

    def flush(self) -> None:
        if not self.lines:
            return
        key = Keys.log(self.job_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(key, *self.lines)
            pipe.ltrim(key, -_LOG_KEEP, -1)
            pipe.expire(key, 86400)
            pipe.execute()
        except redis.RedisError as exc:
            if len(self.lines) < _LOG_KEEP:
                return  # keep them for the next flush
            log.warning("job %s: dropped %d log lines: %s", self.job_id, len(self.lines), exc)
        self.lines.clear()


def register(
    app: Celery, settings: Settings, engine_factory: Callable[[], Engine] | None = None
) -> Task:
    """Define the build task on ``app``; one Redis client and one engine per process."""
    state: dict[str, Any] = {}

    def client() -> redis.Redis:
        if "redis" not in state:
            state["redis"] = redis.Redis.from_url(app.conf.broker_url)
        return state["redis"]  # type: ignore[no-any-return]

    def engine() -> Engine:
        if "engine" not in state:
            factory = engine_factory or (
                lambda: DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)
            )
            state["engine"] = factory()
        return state["engine"]  # type: ignore[no-any-return]

    class BuildTask(Task):  # type: ignore[misc]
        def after_return(
            self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # The result is stored by now: drop the flight key, so that the next submit
            # of this profile starts afresh (after a failure) or finds the cache.
            profile_id = (kwargs or {}).get("profile_id")
            if profile_id:
                forced = bool((kwargs.get("request") or {}).get("force_rebuild"))
                delete_if_value(client(), Keys.flight(profile_id, forced), task_id)

    @app.task(name=PING_TASK, shared=False)  # type: ignore[untyped-decorator]
    def ping() -> str:
        """A task that does nothing: the baseline of the queue benchmark."""
        return "pong"

    # max_retries=None: lock waits retry until Settings.lock_wait_max, checked in the task
    @app.task(bind=True, base=BuildTask, name=TASK_NAME, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def build(
        self: Task,
        request: dict[str, Any],
        profile_id: str,
        submitted_at: float,
        lock_wait_since: float | None = None,
    ) -> dict[str, Any]:
        started = time.time()
        job_id = self.request.id
        if client().exists(Keys.cancel(job_id)):
            # cancelled while queued, and this worker missed the revoke broadcast
            raise Ignore()
        worker = f"{self.request.hostname or settings.host_id}:{os.getpid()}"
        base: dict[str, Any] = {
            "profile_id": profile_id,
            "worker": worker,
            "docker_host": settings.host_id,
        }
        try:
            req = validate_request(request, settings)
            relative = [
                p for p in (req.repo_dir, req.image_cache_dir) if p and not os.path.isabs(p)
            ]
            if relative:
                raise BadRequest(f"paths sent to a worker must be absolute: {relative}")
            resolved = resolve_request(req, settings)
            if resolved.profile.profile_id != profile_id:
                raise BadRequest("profile_id does not match the profile sent with it")
            lock = ProfileLock(client(), profile_id, ttl=settings.lock_ttl, owner=worker)
            reporter = Reporter(self, client(), job_id, base, check=lock.check)
            if not lock.acquire():
                since = lock_wait_since or started
                if started - since > settings.lock_wait_max:
                    raise PfbuildError(
                        f"profile {profile_id} stayed locked for more than "
                        f"{settings.lock_wait_max}s (holder: {lock.holder()})"
                    )
                reporter.publish(JobState.WAITING_FOR_LOCK.value, holder=lock.holder())
                # Retrying frees this worker slot; the job comes back in a moment.
                raise self.retry(
                    countdown=settings.lock_poll_seconds,
                    kwargs={
                        "request": request,
                        "profile_id": profile_id,
                        "submitted_at": submitted_at,
                        "lock_wait_since": since,
                    },
                )
            try:
                starts = client().incr(Keys.starts(job_id))
                client().expire(Keys.starts(job_id), settings.result_expires)
                if int(starts) > settings.max_deliveries:
                    raise PfbuildError(
                        f"job {job_id} was started {int(starts) - 1} times and its worker "
                        "was lost each time; giving up rather than trying again"
                    )
                first_seen = lock_wait_since or started
                timings = Timings(
                    queue_wait=max(0.0, first_seen - submitted_at),
                    lock_wait=started - first_seen if lock_wait_since else 0.0,
                )
                base["fence"] = lock.fence
                with lock.watchdog():
                    answer = run_build(
                        req,
                        settings,
                        engine(),
                        progress=reporter,
                        worker=worker,
                        guard=lock.check,
                        timings=timings,
                    )
                    lock.check()
            finally:
                reporter.flush()
                lock.release()
            return answer.model_dump(mode="json")
        except SoftTimeLimitExceeded:
            raise BuildTimeout(
                f"the build of {profile_id} exceeded the soft time limit of "
                f"{settings.build_soft_time_limit}s and was stopped"
            ) from None
        except LockLost:
            # Someone else may be running this very job now (a redelivery); publishing a
            # failure would end their flight. Put the job back instead: whoever gets it
            # next finds the lock held or the image built.
            log.warning("job %s lost its lock on %s; requeued", job_id, profile_id)
            raise Reject(requeue=True) from None
        except (PfbuildError, Retry, Ignore):
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            raise PfbuildError(
                f"internal error in the worker: {type(exc).__name__}: {exc}"
            ) from None

    return build
