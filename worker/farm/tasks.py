"""The Celery task: a thin shell that runs the pipeline under the profile lock.

A job goes: resolve its request → answer a hit on this engine (no lock, no heartbeat, no
look at Redis: the result store keeps a cancellation or an answer already stored; an
engine that does not answer hands the job to another host's:
:mod:`pfbuild.worker.farm.handback`) → skip it if cancelled, or if a copy of it already
answered → take the job over (a copy whose job runs elsewhere ends here:
:mod:`pfbuild.worker.farm.liveness`) and beat while it
runs, stopping the build if it is cancelled → take the profile lock (or park on its wait
list, freeing the worker slot and the broker: :mod:`pfbuild.worker.farm.lockwait`) → count the
start (redeliveries are capped) → run the pipeline under the lock's watchdog → answer
(an engine that fails under the build hands the job on, once the lock is released) → a
new image's publications, with the lock, go to the process' publisher, which runs them
once the answer is stored (:mod:`pfbuild.worker.farm.publishing`).
Every way it can end is a specific error of :mod:`pfbuild.client.errors`, serialised as
JSON, never a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, NoReturn

import redis
from celery import Celery, Task, signals
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.states import READY_STATES
from kombu.exceptions import OperationalError

from pfbuild.client.errors import (
    BadRequest,
    BuildTimeout,
    DeliveriesExhausted,
    EngineUnavailable,
    InternalError,
    JobCancelled,
    LockLost,
    LockWaitExceeded,
    PfbuildError,
)
from pfbuild.client.models import BuildAnswer, JobState, Timings
from pfbuild.client.profile import validate_request
from pfbuild.client.queue import PING_TASK, TASK_NAME, Keys, signal_done
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings
from pfbuild.worker.build.resolve import ResolvedRequest, resolve_request
from pfbuild.worker.engine import Abort, DockerEngine, Engine, engine_from_settings
from pfbuild.worker.farm.farmstate import FarmState
from pfbuild.worker.farm.handback import events_of, hand_back
from pfbuild.worker.farm.liveness import Heartbeat
from pfbuild.worker.farm.lock import ProfileLock
from pfbuild.worker.farm.lockwait import WaitList
from pfbuild.worker.farm.progress import Reporter
from pfbuild.worker.farm.publishing import Publisher
from pfbuild.worker.pipeline import Pending, reuse_local, run_build

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
        return connect(
            self.app.conf.broker_url,
            self.settings,
            socket_timeout=self.settings.worker_redis_socket_timeout,
        )

    @cached_property
    def engine(self) -> Engine:
        engine = self._engine_factory()
        if isinstance(engine, DockerEngine) and self.settings.image_watch_seconds > 0:
            engine.follow_images(self.settings.image_watch_seconds)
        return engine

    @cached_property
    def publisher(self) -> Publisher:
        """Runs the publications of this process' jobs after their answers."""
        return Publisher(self.app, self.settings, lambda: self.redis, lambda: self.engine)


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
        self.abort = Abort()
        self.worker = f"{task.request.hostname or self.settings.host_id}:{os.getpid()}"
        # publications to run after the answer, each with the profile lock it keeps held
        self.handed: list[tuple[Pending, ProfileLock | None]] = []
        self.base: dict[str, Any] = {
            "profile_id": self.profile_id,
            "worker": self.worker,
            "docker_host": self.settings.host_id,
        }

    def run(self) -> dict[str, Any]:
        resolved = self.resolve()
        hit = self.check_hit(resolved)
        if hit is not None:
            # No lock, no heartbeat and no look at Redis: a copy of a hit is just another
            # hit, and the result store keeps an answer or a cancellation already stored
            # (it only wakes the waiters then). Storing the answer wakes them and ends the
            # flight in the same step (worker/farm/results.py).
            return hit.model_dump(mode="json")
        cancelled, answered = self.look_up()
        if cancelled:
            raise Ignore()  # cancelled while queued, and this worker missed the revoke
        if answered:
            self.answered_already()
        # a job in a slot for longer than a hit: what `pfbuild top` and routing count
        FarmState(self.proc.redis, self.settings).started(self.id, self.profile_id, self.worker)
        self.beat = Heartbeat(
            self.proc.redis,
            self.proc.app,
            self.settings,
            self.id,
            self.worker,
            on_cancel=self.abort.trigger,
        )
        self.take_over()
        try:
            with self.beat.running():
                answer = self.build_locked(resolved)
        except EngineUnavailable as exc:
            # the engine died under the build: the lock and heartbeat are released, so
            # another host can take the job up as if it had never started here
            self.hand_back_or_raise(exc)
        if self.abort.triggered.is_set() or self.proc.redis.exists(Keys.cancel(self.id)):
            raise JobCancelled(f"job {self.id} was cancelled")  # its answer never lands
        return answer

    def look_up(self) -> tuple[bool, bool]:
        """Whether the job was cancelled, and whether its answer is stored: one round trip."""
        backend = self.task.backend
        pipe = self.proc.redis.pipeline(transaction=False)
        pipe.exists(Keys.cancel(self.id))
        pipe.get(backend.get_key_for_task(self.id))
        cancelled, stored = pipe.execute()
        status = backend.decode_result(stored).get("status") if stored else None
        return bool(cancelled), str(status) in READY_STATES

    def check_hit(self, resolved: ResolvedRequest) -> BuildAnswer | None:
        """The hit path on this engine. An engine that does not answer (nothing is built
        yet) hands the job to a host whose engine does, or fails it if there is none."""
        try:
            engine = self.proc.engine
            if resolved.request.force_rebuild and not engine.ping():  # no inspect to tell
                raise EngineUnavailable(f"Docker engine at {engine.host} does not answer")
            return reuse_local(
                resolved,
                self.settings,
                engine,
                worker=self.worker,
                timings=self.timings(),
                events=events_of(self.kwargs),
                handoff=lambda pending: self.handed.append((pending, None)),
            )
        except EngineUnavailable as exc:
            self.hand_back_or_raise(exc)

    def hand_back_or_raise(self, exc: EngineUnavailable) -> NoReturn:
        """This host's engine failed: hand the job to a host whose engine answers, or fail
        with ``exc`` when there is none. A job cancelled or answered meanwhile is not
        handed on."""
        cancelled, answered = self.look_up()
        if cancelled:
            raise Ignore() from None
        if answered:
            self.answered_already()
        proc = self.proc
        target = hand_back(self.task, proc.app, proc.redis, self.settings, self.kwargs, exc)
        if target is None:
            raise exc
        log.warning("job %s: engine does not answer (%s); handed to host %s",
                    self.id, exc.message, target)
        raise Ignore() from None

    def answered(self) -> bool:
        return self.look_up()[1]

    def answered_already(self) -> NoReturn:
        """A copy whose answer is stored: wake the waiters, store nothing, acknowledge."""
        flight = self.kwargs.get("flight")
        flight_key = flight if isinstance(flight, str) else None
        signal_done(self.proc.redis, self.id, self.settings.result_expires, flight_key)
        raise Ignore()

    def take_over(self) -> None:
        """Make this delivery the one that runs the job, or end it harmlessly.

        A copy whose answer is stored acknowledges itself; a copy of a job another delivery
        runs (its heartbeat is fresh) steps aside if another message of the job is on the
        broker, else waits as the job's last message until that run ends or stops beating.
        """
        last_visible = 0.0
        while True:
            if self.answered():
                self.answered_already()
            holder = self.beat.claim()
            if holder is None:
                return
            if self.beat.others_on_broker():
                log.info("job %s runs elsewhere (%s); this copy steps aside", self.id, holder)
                raise Ignore()
            if time.monotonic() - last_visible >= self.settings.job_heartbeat_seconds:
                self.beat.keep_visible()
                last_visible = time.monotonic()
            time.sleep(1)

    def build_locked(self, resolved: ResolvedRequest) -> dict[str, Any]:
        """Take the profile lock (or park), build under it, release it, wake waiters."""
        lock = ProfileLock(
            self.proc.redis, self.profile_id, ttl=self.settings.lock_ttl, owner=self.worker
        )
        guard = self.guard(lock)
        reporter = Reporter(
            self.task, self.proc.redis, self.settings, self.base, self.guard(lock, often=True)
        )
        while not lock.acquire():
            self.wait_for_lock(lock, reporter)
        kept = False  # the lock stays held by the publications handed on, if any
        try:
            self.count_start()
            self.base["fence"] = lock.fence
            with lock.watchdog():
                answer = self.build(resolved, reporter, lock, guard)
                guard()
            kept = any(held is lock for _, held in self.handed)
        except BaseException:
            self.drop_handed()
            raise
        finally:
            reporter.close()
            if not kept:
                lock.release()
                self.wake_waiters()
        return answer.model_dump(mode="json")

    def drop_handed(self) -> None:
        """A run that fails publishes nothing: its publications stay pending in their
        record, for the next job of the profile (or a sweep) to take over."""
        for pending, _ in self.handed:
            pending.release()
        self.handed.clear()

    def wake_waiters(self) -> None:
        """Send again the jobs parked on the lock just released (the sweeper would, later)."""
        try:
            WaitList(self.proc.redis, self.proc.app, self.profile_id).wake()
        except (redis.RedisError, OperationalError) as exc:
            log.warning("could not wake the jobs waiting for %s: %s", self.profile_id, exc)

    def store_cancelled(self) -> None:
        try:
            # with the request, the store also wakes the waiters and ends the flight
            self.task.backend.mark_as_revoked(
                self.id, reason="cancelled by the client", request=self.task.request
            )
        except (redis.RedisError, OperationalError) as exc:
            log.warning("job %s: could not store its cancellation: %s", self.id, exc)

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

    def wait_for_lock(self, lock: ProfileLock, reporter: Reporter) -> None:
        """Park on the profile's wait list and end this delivery (its slot is free, and no
        message of the job waits on the broker); the lock's release sends the job again
        (worker/farm/lockwait.py). Returns only if the lock was freed meanwhile: try again."""
        since = self.kwargs.get("lock_wait_since") or self.started
        if time.time() - since > self.settings.lock_wait_max:
            raise LockWaitExceeded(
                f"profile {self.profile_id} stayed locked for more than "
                f"{self.settings.lock_wait_max}s (holder: {lock.holder()})"
            )
        reporter.publish(JobState.WAITING_FOR_LOCK, holder=lock.holder())
        waits = WaitList(self.proc.redis, self.proc.app, self.profile_id)
        # no beat while parking: the park drops the heartbeat with it, so a copy sent by
        # a wake-up at once never finds this delivery's beat and steps aside for it
        self.beat.pause()
        queue = (self.task.request.delivery_info or {}).get("routing_key")
        if waits.park(self.id, {**self.kwargs, "lock_wait_since": since}, self.beat.token, queue):
            raise Ignore()
        self.beat.resume()

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

    def guard(self, lock: ProfileLock, often: bool = False) -> Callable[[], None]:
        """What runs before each write others read: stop if cancelled, or if the lock is
        no longer ours at our fence. ``often``: for each log line (Redis asked at most
        once a second)."""
        lock_check = lock.check_often if often else lock.check

        def check() -> None:
            if self.abort.triggered.is_set():
                raise JobCancelled(f"job {self.id} was cancelled")
            lock_check()

        return check

    def build(
        self,
        resolved: ResolvedRequest,
        reporter: Reporter,
        lock: ProfileLock,
        guard: Callable[[], None],
    ) -> BuildAnswer:
        return run_build(
            resolved,
            self.settings,
            self.proc.engine,
            progress=reporter,
            worker=self.worker,
            guard=guard,
            fence=lock.fence,
            abort=self.abort,
            timings=self.timings(),
            events=events_of(self.kwargs),
            handoff=lambda pending: self.handed.append((pending, lock)),
            # the profile lock serialises publications, unless they run detached
            wait_for_publication=self.settings.publish_detached,
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
    except JobCancelled:
        # The client stored REVOKED when it cancelled; store it again (its write may have
        # failed) and never an answer over it. Nothing more is stored for this delivery.
        job.store_cancelled()
        raise Ignore() from None
    except LockLost:
        # Someone else may be running this very job now (a redelivery); publishing a
        # failure would end their flight. Put the job back instead: whoever gets it next
        # finds the lock held or the image built.
        log.warning("job %s lost its lock on %s; requeued", job.id, job.profile_id)
        raise Reject(requeue=True) from None
    except (PfbuildError, Retry, Ignore, Reject):
        raise
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        # A Redis blip outside the build (taking the lock, parking, counting a start):
        # hand the job back rather than fail it. If Redis cannot take it back now, the
        # message stays unacknowledged and returns after the visibility timeout.
        log.warning("job %s handed back after a Redis error: %s", job.id, exc)
        raise Reject(requeue=True) from None
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job.id)
        raise InternalError(f"internal error in the worker: {type(exc).__name__}: {exc}") from None


def register(
    app: Celery, settings: Settings, engine_factory: Callable[[], Engine] | None = None
) -> Task:
    """Define the build (and ping) tasks on ``app``; one Redis client and engine per process."""
    proc = _Process(app, settings, engine_factory)

    class BuildTask(Task):  # type: ignore[misc]
        # Storing a final result also wakes the job's waiters and ends its flight, so
        # that the next submit of the profile starts afresh or finds the cache; a job
        # parked for its lock or handed back lives on, and so does its flight
        # (worker/farm/results.py).

        # Celery logs each result's repr at INFO; the answer is kilobytes, and our own
        # structured stage line says how the job ended
        resultrepr_maxsize = 120

        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            # called once the answer is stored: the job's publications may go
            proc.publisher.answered(task_id)

    @app.task(name=PING_TASK, shared=False)  # type: ignore[untyped-decorator]
    def ping(size: int = 0) -> str:
        """A task that does nothing: the baseline of the benchmarks; its result is ``size``
        bytes when asked (as large as an answer), else ``pong``."""
        return "p" * min(size, 1 << 20) if size else "pong"

    @app.task(bind=True, base=BuildTask, name=TASK_NAME, shared=False)  # type: ignore[untyped-decorator]
    def build(self: Task, **kwargs: Any) -> dict[str, Any]:
        job = _Job(self, proc, kwargs)
        try:
            answer = _run_job(job)
        except BaseException:
            # no answer to wait for (a cancel after the build, say): publish at once
            proc.publisher.hand(job.id, job.handed, answered=True)
            raise
        proc.publisher.hand(job.id, job.handed)  # they go once the answer is stored
        return answer

    def publications_land(**_: Any) -> None:
        proc.publisher.join()  # a process shutting down lets its publications land

    signals.worker_process_shutdown.connect(publications_land, weak=False)
    signals.worker_shutdown.connect(publications_land, weak=False)
    return build
