"""The Celery task: a thin shell that runs the pipeline under the profile lock.

A job goes: skip it if cancelled → resolve its request → take the profile lock (or come
back later, freeing the worker slot) → count the start (redeliveries are capped) → run
the pipeline under the lock's watchdog → answer. Every way it can end is a specific
error of :mod:`pfbuild.client.errors`, serialised as JSON, never a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, NoReturn

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.states import READY_STATES

from pfbuild.client.errors import (
    BadRequest,
    BuildTimeout,
    DeliveriesExhausted,
    InternalError,
    LockLost,
    LockWaitExceeded,
    PfbuildError,
)
from pfbuild.client.models import BuildAnswer, JobState, Timings
from pfbuild.client.profile import validate_request
from pfbuild.client.queue import PING_TASK, TASK_NAME, Keys, end_flight, signal_done
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import Engine, engine_from_settings
from pfbuild.worker.lock import ProfileLock
from pfbuild.worker.pipeline import reuse_local, run_build
from pfbuild.worker.progress import Reporter
from pfbuild.worker.resolve import ResolvedRequest, resolve_request

__all__ = ["register"]

log = logging.getLogger(__name__)


class _Process:
    """What one worker process shares between its jobs: a Redis client and an engine."""

    def __init__(
        self, app: Celery, settings: Settings, engine_factory: Callable[[], Engine] | None
    ) -> None:
        self.app = app
        self.settings = settings
        self._engine_factory = engine_factory or (lambda: engine_from_settings(settings))

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.app.conf.broker_url)

    @cached_property
    def engine(self) -> Engine:
        return self._engine_factory()


class _Job:
    """One delivery of one build job, as a short list of named steps."""

    def __init__(self, task: Task, proc: _Process, kwargs: dict[str, Any]) -> None:
        self.task = task
        self.proc = proc
        self.settings = proc.settings
        self.kwargs = kwargs
        self.id = str(task.request.id)
        self.profile_id = str(kwargs["profile_id"])
        self.started = time.time()
        self.worker = f"{task.request.hostname or self.settings.host_id}:{os.getpid()}"
        self.base: dict[str, Any] = {
            "profile_id": self.profile_id,
            "worker": self.worker,
            "docker_host": self.settings.host_id,
        }

    def run(self) -> dict[str, Any]:
        if self.proc.redis.exists(Keys.cancel(self.id)):
            raise Ignore()  # cancelled while queued, and this worker missed the revoke
        resolved = self.resolve()
        hit = reuse_local(
            resolved, self.settings, self.proc.engine, worker=self.worker, timings=self.timings()
        )
        if hit is not None:
            # no lock needed to read the engine; the flight ends before the answer is
            # stored, so the next submit starts a job of its own (a hit) at once instead
            # of finding this one finished and cleaning up after it
            self.end_flight()
            return hit.model_dump(mode="json")
        lock = ProfileLock(
            self.proc.redis, self.profile_id, ttl=self.settings.lock_ttl, owner=self.worker
        )
        reporter = Reporter(self.task, self.proc.redis, self.settings, self.base, lock.check)
        if not lock.acquire():
            self.wait_for_lock(lock, reporter)
        try:
            self.count_start()
            self.base["fence"] = lock.fence
            with lock.watchdog():
                answer = self.build(resolved, reporter, lock.check)
                lock.check()
        finally:
            reporter.flush()
            lock.release()
        return answer.model_dump(mode="json")

    def end_flight(self) -> None:
        flight = self.kwargs.get("flight")
        if isinstance(flight, str):
            end_flight(self.proc.redis, flight, self.id)

    def resolve(self) -> ResolvedRequest:
        """Validate and resolve the request once; the pipeline takes it from here."""
        req = validate_request(self.kwargs["request"], self.settings)
        relative = [p for p in (req.repo_dir, req.image_cache_dir) if p and not os.path.isabs(p)]
        if relative:
            raise BadRequest(f"paths sent to a worker must be absolute: {relative}")
        resolved = resolve_request(req, self.settings)
        if resolved.profile_id != self.profile_id:
            raise BadRequest("profile_id does not match the profile sent with it")
        return resolved

    def wait_for_lock(self, lock: ProfileLock, reporter: Reporter) -> NoReturn:
        """Come back in a moment (freeing this worker slot), or give up after the maximum."""
        since = self.kwargs.get("lock_wait_since") or self.started
        if self.started - since > self.settings.lock_wait_max:
            raise LockWaitExceeded(
                f"profile {self.profile_id} stayed locked for more than "
                f"{self.settings.lock_wait_max}s (holder: {lock.holder()})"
            )
        reporter.publish(JobState.WAITING_FOR_LOCK, holder=lock.holder())
        raise self.task.retry(
            countdown=self.settings.lock_poll_seconds,
            kwargs={**self.kwargs, "lock_wait_since": since},
        )

    def count_start(self) -> None:
        """Each start under the lock counts; a job whose worker keeps dying is given up."""
        key = Keys.starts(self.id)
        starts = int(self.proc.redis.incr(key))
        self.proc.redis.expire(key, self.settings.result_expires)
        if starts > self.settings.max_deliveries:
            raise DeliveriesExhausted(
                f"job {self.id} was started {starts - 1} times and its worker was lost each "
                "time; giving up rather than trying again"
            )

    def timings(self) -> Timings:
        """What this job spent before the pipeline: queued, and waiting for the lock."""
        first_seen = self.kwargs.get("lock_wait_since") or self.started
        return Timings(
            queue_wait=max(0.0, first_seen - float(self.kwargs["submitted_at"])),
            lock_wait=self.started - first_seen,
        )

    def build(
        self, resolved: ResolvedRequest, reporter: Reporter, guard: Callable[[], None]
    ) -> BuildAnswer:
        return run_build(
            resolved,
            self.settings,
            self.proc.engine,
            progress=reporter,
            worker=self.worker,
            guard=guard,
            timings=self.timings(),
        )


def _run_job(job: _Job) -> dict[str, Any]:
    """Run ``job``; turn what escapes into the error an agent should see."""
    try:
        return job.run()
    except SoftTimeLimitExceeded:
        raise BuildTimeout(
            f"the build of {job.profile_id} exceeded the soft time limit of "
            f"{job.settings.build_soft_time_limit}s and was stopped"
        ) from None
    except LockLost:
        # Someone else may be running this very job now (a redelivery); publishing a
        # failure would end their flight. Put the job back instead: whoever gets it next
        # finds the lock held or the image built.
        log.warning("job %s lost its lock on %s; requeued", job.id, job.profile_id)
        raise Reject(requeue=True) from None
    except (PfbuildError, Retry, Ignore, Reject):
        raise
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job.id)
        raise InternalError(f"internal error in the worker: {type(exc).__name__}: {exc}") from None


def register(
    app: Celery, settings: Settings, engine_factory: Callable[[], Engine] | None = None
) -> Task:
    """Define the build (and ping) tasks on ``app``; one Redis client and engine per process."""
    proc = _Process(app, settings, engine_factory)

    class BuildTask(Task):  # type: ignore[misc]
        # Celery logs each result's repr at INFO; the answer is kilobytes, and our own
        # structured stage line says how the job ended
        resultrepr_maxsize = 120

        def after_return(
            self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # The result is stored by now: end the flight, so that the next submit of this
            # profile starts afresh (after a failure) or finds the cache.
            # A job waiting for its lock (RETRY) or handed back (REJECTED) lives on, and so
            # does its flight; an ended one wakes its waiters and ends its flight.
            if status in READY_STATES:
                flight = (kwargs or {}).get("flight")
                flight_key = flight if isinstance(flight, str) else None
                signal_done(proc.redis, task_id, settings.result_expires, flight_key)

    @app.task(name=PING_TASK, shared=False)  # type: ignore[untyped-decorator]
    def ping() -> str:
        """A task that does nothing: the baseline of the queue benchmark."""
        return "pong"

    # max_retries=None: lock waits retry until Settings.lock_wait_max, checked in the task
    @app.task(bind=True, base=BuildTask, name=TASK_NAME, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def build(self: Task, **kwargs: Any) -> dict[str, Any]:
        return _run_job(_Job(self, proc, kwargs))

    return build
