"""The client library agents import: submit builds, poll them, read their logs.

    client = BuildClient()                      # PFBUILD_REDIS_URL, or redis_url=...
    job = client.submit({"repo_dir": ..., "profile_path": ...})
    job.status()                                # state, stage, step i/n, last log line
    answer = job.result(timeout=600)            # BuildAnswer, or raises BuildFailed, JobLost…
    for line in job.logs(follow=True): ...
    answer = await job                          # the asyncio twin of result()

Submitting is single-flight: while a job for a profile is queued or running, submitting
the same profile again returns that job, so N agents cause one build. Every read is a
poll of a Redis key; nothing subscribes to a channel per job (celery#5320).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from typing import Any, cast

import redis
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field

from pfbuild.client.errors import (
    InternalError,
    JobCancelled,
    JobLost,
    JobTimeout,
    PfbuildError,
    QueueUnavailable,
)
from pfbuild.client.hits import KnownHits, tree_fingerprint
from pfbuild.client.hosts import Router, list_hosts
from pfbuild.client.models import BuildAnswer, BuildRequest, JobState, Publication, PublishKind
from pfbuild.client.profile import load_profile_file, parse_profile, validate_request
from pfbuild.client.queue import (
    TASK_NAME,
    Keys,
    claim_flight_command,
    end_flight,
    flight_holder,
    job_state,
    make_celery,
    mark_sent,
    signal_done,
)
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings

__all__ = ["BuildClient", "BuildJob", "JobStatus"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _backoff(ceiling: float, start: float = 0.01, factor: float = 1.5) -> Iterator[float]:
    delay = start
    while True:
        yield min(delay, ceiling)
        delay *= factor


class JobStatus(BaseModel):
    """A snapshot of a job."""

    id: str
    state: JobState
    stage: str
    step: int | None = None
    steps: int | None = None
    line: str | None = None
    profile_id: str | None = None
    worker: str | None = None
    docker_host: str | None = None
    # what is published of the image the job built (tarball, registry), kept up to date
    # after the answer until each has landed
    publications: dict[PublishKind, Publication] = Field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state.ready


# The shortest time between two looks at a job in result(): its floor when a look does
# not block (a server without BLMOVE), so that waiting never becomes a busy loop.
_MIN_LOOK_INTERVAL = 0.05


class BuildJob:
    """A handle on one job; reads like a ``concurrent.futures.Future``."""

    def __init__(
        self,
        client: BuildClient,
        job_id: str,
        profile_id: str | None = None,
        joined: bool = False,
        flight_key: str | None = None,
        answer: BuildAnswer | None = None,
        learn: tuple[tuple[str, ...], str] | None = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.profile_id = profile_id
        self.joined = joined  # True when this submit joined a flight already under way
        self.flight_key = flight_key
        # a hit the client answered itself (client/hits.py): no job on the farm
        self.answered = answer
        self._learn = learn  # (checkout, fingerprint) to remember the answer under

    def __repr__(self) -> str:
        return f"<BuildJob {self.id} profile={self.profile_id} joined={self.joined}>"

    def _meta(self) -> tuple[str, Any]:
        try:
            meta = self.client.app.backend.get_task_meta(self.id)
        except (redis.RedisError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot read job {self.id}: {exc}") from None
        return str(meta.get("status", "PENDING")), meta.get("result")

    def status(self) -> JobStatus:
        """Where the job is; ``lost`` when it has neither an answer nor a record (the
        error :meth:`result` raises then is :class:`JobLost`)."""
        if self.answered is not None:
            return JobStatus(id=self.id, state=JobState.SUCCESS, stage=JobState.SUCCESS.value,
                             profile_id=self.profile_id, worker=self.answered.worker,
                             docker_host=self.answered.docker_host)
        meta, exists = self._look()
        celery_state, info = str(meta.get("status", "PENDING")), meta.get("result")
        state = JobState.LOST if not (meta or exists) else job_state(celery_state)
        # a stage's meta, or the answer on success: both carry the fields read here
        fields = info if isinstance(info, dict) else {}
        known = {
            k: fields.get(k)
            for k in ("step", "steps", "line", "profile_id", "worker", "docker_host")
            if fields.get(k) is not None
        }
        known.setdefault("profile_id", self.profile_id)
        stage = str(fields.get("stage") or state.value)
        published = self.publications(fields.get("manifest") if state.ready else None)
        return JobStatus(id=self.id, state=state, stage=stage, publications=published, **known)

    def publications(self, manifest: Any = None) -> dict[PublishKind, Publication]:
        """What is published of the image the job built, as the worker publishing it last
        said (its answer's ``manifest``, if given, until then)."""
        try:
            raw = self.client.redis.hgetall(Keys.publications(self.id))
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot read job {self.id}: {exc}") from None
        found = {_text(k): Publication.model_validate_json(v) for k, v in raw.items()}
        if not found and isinstance(manifest, dict):
            answered = manifest.get("publications") or {}
            found = {k: Publication.model_validate(v) for k, v in answered.items()}
        return {cast(PublishKind, k): v for k, v in found.items() if k in ("tarball", "registry")}

    def _outcome(self) -> BuildAnswer | None:
        return self._answer_of(*self._meta())

    def _answer_of(self, celery_state: str, info: Any) -> BuildAnswer | None:
        state = job_state(celery_state)
        if state is JobState.SUCCESS:
            return BuildAnswer.model_validate(info)
        if state is JobState.FAILURE:
            if isinstance(info, PfbuildError):
                raise info
            raise InternalError(f"job {self.id} failed: {info!r}")
        if state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} was cancelled")
        return None

    def poll(self, wait: float = 0.0) -> BuildAnswer | None:
        """One look at the job: its answer, its error, JobLost, or None (not finished).

        With ``wait``, the look first blocks (at most that many seconds) on the job's done
        signal, which the worker pushes as it stores the result: a hit is seen the moment
        it is stored, in the same round trip, with no subscription per job (celery#5320)
        and no busy loop. The signal stays for other waiters.

        A job with neither an answer nor a record no longer exists (never sent, or wiped
        with Redis). The answer is stored before a record expires, so the answer is read
        again before the job is declared lost.
        """
        if self.answered is not None:
            return self.answered
        meta, exists = self._look(wait)
        answer = self._answer_of(str(meta.get("status", "PENDING")), meta.get("result"))
        if answer is not None and self._learn is not None:
            self.client.known.learn(*self._learn, answer)
            self._learn = None
        if answer is not None or exists:
            return answer
        answer = self._outcome()
        if answer is not None:
            return answer
        raise JobLost(
            f"job {self.id} no longer exists (it was never sent, or Redis lost it): "
            "submit the request again"
        )

    def _look(self, wait: float = 0.0) -> tuple[dict[str, Any], bool]:
        """The job's stored result ({} if none) and whether its record exists, in one round
        trip; with ``wait``, first blocked on the job's done signal (see :meth:`poll`)."""
        backend = self.client.app.backend
        block = wait > 0 and self.client.blocking_reads
        try:
            pipe = self.client.redis.pipeline(transaction=False)
            if block:
                # shorter than the socket timeout, or the socket would time out; Redis
                # takes fractional seconds (since 6.0), redis-py's stub says int
                seconds: Any = max(0.01, min(wait, self.client.settings.redis_socket_timeout / 2))
                pipe.blmove(Keys.done(self.id), Keys.done(self.id), seconds, "LEFT", "RIGHT")
            pipe.get(backend.get_key_for_task(self.id))
            pipe.exists(Keys.job(self.id))
            *_, raw, exists = pipe.execute()
        except redis.ResponseError as exc:
            if not (block and "unknown command" in str(exc).lower()):
                raise QueueUnavailable(f"cannot read job {self.id}: {exc}") from None
            self.client.blocking_reads = False  # a server without BLMOVE: plain polling
            return self._look()
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot read job {self.id}: {exc}") from None
        return (backend.decode_result(raw) if raw else {}), bool(exists)

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        limit = self.client.settings.wait_timeout if timeout is None else timeout
        return limit, time.monotonic() + limit

    def result(self, timeout: float | None = None, poll: float = 0.5) -> BuildAnswer:
        """Wait for the answer; re-raise the worker's structured error on failure.

        ``timeout`` defaults to ``Settings.wait_timeout``. A job that no longer exists
        raises JobLost within a poll; a Redis that cannot be reached raises
        QueueUnavailable once ``redis_outage_tolerance`` (or the timeout) has passed.
        Each look blocks at most ``poll`` seconds on the job's done signal (:meth:`poll`).
        """
        limit, deadline = self._deadline(timeout)
        outage: float | None = None
        while True:
            try:
                wait = min(poll, deadline - time.monotonic())
                looked = time.monotonic()
                answer = self.poll(wait=wait)
                if answer is not None:
                    return answer
                outage = None
                # a look that came back at once without an answer (a server whose BLMOVE
                # does not block, or a signal whose result is not final) does not spin
                time.sleep(max(0.0, min(_MIN_LOOK_INTERVAL, wait) - (time.monotonic() - looked)))
                if time.monotonic() >= deadline:
                    raise JobTimeout(
                        f"job {self.id} not finished after {limit}s ({self.status().stage})"
                    )
            except QueueUnavailable:
                now = time.monotonic()
                outage = now if outage is None else outage
                tolerance = self.client.settings.redis_outage_tolerance
                if now >= deadline or now - outage >= tolerance:
                    raise
                time.sleep(min(poll, max(0.0, deadline - now)))

    wait = result

    async def result_async(self, timeout: float | None = None, poll: float = 0.5) -> BuildAnswer:
        """The asyncio twin of :meth:`result`: polls without blocking the event loop."""
        limit, deadline = self._deadline(timeout)
        for delay in _backoff(poll):
            answer = await asyncio.to_thread(self.poll)
            if answer is not None:
                return answer
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} not finished after {limit}s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def __await__(self) -> Generator[Any, None, BuildAnswer]:
        return self.result_async().__await__()

    def logs(self, follow: bool = False, poll: float = 0.25) -> Iterator[str]:
        """The build's log lines so far (a late joiner gets them all), then live ones."""
        key, index = Keys.log(self.id), 0
        while True:
            done = self.status().ready  # read before the lines, so none are missed
            try:
                lines = self.client.redis.lrange(key, index, -1)
            except redis.RedisError as exc:
                raise QueueUnavailable(f"cannot read the log of job {self.id}: {exc}") from None
            for raw in lines:
                yield raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            index += len(lines)
            if not follow or (done and not lines):
                return
            if not lines:
                time.sleep(poll)

    def cancel(self) -> None:
        """Cancel the job (its worker stops the engine's build) and leave its flight.

        Every agent that joined this job's flight sees it cancelled: they share one job.
        A hit the client answered itself has nothing to cancel.
        """
        if self.answered is not None:
            return
        try:
            # the flag outlives Celery's in-memory revoke list: a worker that starts later
            # (or restarts) still skips the job
            self.client.redis.set(Keys.cancel(self.id), 1, ex=self.client.settings.result_expires)
            # no terminate: the worker running it sees the flag within half a second and
            # stops the engine's build itself, in every pool (threads included)
            self.client.app.control.revoke(self.id)
            self.client.app.backend.mark_as_revoked(self.id, reason="cancelled by the client")
            signal_done(self.client.redis, self.id, self.client.settings.result_expires)
            if self.flight_key:
                end_flight(self.client.redis, self.flight_key, self.id)
        except (redis.RedisError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot cancel job {self.id}: {exc}") from None


class BuildClient:
    """Submits build requests to the farm and hands back :class:`BuildJob` handles."""

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        url = redis_url or self.settings.redis_url
        if not url:
            raise QueueUnavailable(
                "no Redis configured: set PFBUILD_REDIS_URL (or use `pfbuild submit --wait`, "
                "which runs an embedded broker and worker)"
            )
        self.url = url
        timeout = self.settings.redis_socket_timeout
        self.app = make_celery(self.settings, url, name="pfbuild.client", socket_timeout=timeout)
        self.redis = connect(
            url, self.settings, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.router = Router(self.redis, self.settings)
        self.blocking_reads = True  # False once Redis turns out to have no BLMOVE
        self.known = KnownHits()  # the answers its checkouts got (client/hits.py)

    def close(self) -> None:
        self.redis.close()
        self.app.close()

    def __enter__(self) -> BuildClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def job(self, job_id: str) -> BuildJob:
        return BuildJob(self, job_id)

    def workers_alive(self, ping_timeout: float = 1.0) -> bool:
        """Whether any worker consumes this Redis: a live host in the hosts registry (one
        read), else a worker answering Celery's ping within ``ping_timeout`` seconds."""
        try:
            if any(h.alive for h in list_hosts(self.redis, with_images=False)):
                return True
            return bool(self.app.control.ping(timeout=ping_timeout))
        except (redis.RedisError, OperationalError) as exc:
            raise QueueUnavailable(f"cannot reach Redis at {self.url}: {exc}") from None

    def _prepare(self, request: BuildRequest | dict[str, Any]) -> tuple[BuildRequest, str]:
        req = validate_request(request, self.settings)
        if req.profile_path is not None:
            # read here, so that workers on other hosts need no access to the file
            profile = load_profile_file(req.profile_path, self.settings)
            req = req.model_copy(update={"profile": profile, "profile_path": None})
        # paths mean what they mean here, not in a worker's working directory
        update: dict[str, Any] = {"repo_dir": os.path.abspath(req.repo_dir)}
        if req.image_cache_dir:
            update["image_cache_dir"] = os.path.abspath(req.image_cache_dir)
        req = req.model_copy(update=update)
        assert req.profile is not None
        return req, parse_profile(req.profile, settings=self.settings).profile_id

    def submit(self, request: BuildRequest | dict[str, Any]) -> BuildJob:
        """Enqueue one request, or join the job already building its profile; a hit the
        farm already knows is answered here (client/hits.py)."""
        started = time.monotonic()
        req, profile_id = self._prepare(request)
        learn = None
        if self.settings.client_hits and self.settings.routing and not req.force_rebuild:
            checkout = (req.repo_dir, profile_id, req.image_cache_dir or "")
            fingerprint = tree_fingerprint(req.repo_dir)
            known = self.known.recall(checkout, fingerprint) if fingerprint else None
            if known is not None:
                try:
                    answer = self.known.answer(self.redis, known, self.router.live(), started)
                except redis.RedisError as exc:
                    raise QueueUnavailable(f"cannot reach Redis at {self.url}: {exc}") from None
                if answer is not None:
                    return BuildJob(self, str(uuid.uuid4()), profile_id, answer=answer)
            learn = (checkout, fingerprint) if fingerprint else None
        job = self._submit(req, profile_id)
        job._learn = learn
        return job

    def _submit(self, req: BuildRequest, profile_id: str) -> BuildJob:
        key = Keys.flight(profile_id, req.force_rebuild, req.repo_dir)
        try:
            for _ in range(10):
                job_id = str(uuid.uuid4())
                # the claim, and where the job would go, in one round trip
                pipe = self.redis.pipeline(transaction=False)
                pipe.eval(*claim_flight_command(key, job_id, self.settings))
                hosts = self.router.ask(pipe, profile_id)
                # an error in a routing read is "not held" (routed as a new profile),
                # not a failed submit after the claim went through
                claim, *held = pipe.execute(raise_on_error=False)
                if isinstance(claim, Exception):
                    raise claim
                other_id = flight_holder(claim)
                held = [h if not isinstance(h, Exception) else False for h in held]
                if other_id is None:
                    queue = self.router.choose(req, hosts, held)
                    self._send(req, profile_id, job_id, key, queue)
                    return BuildJob(self, job_id, profile_id, flight_key=key)
                other = BuildJob(self, other_id, profile_id, joined=True, flight_key=key)
                if not self.redis.exists(Keys.job(other_id)) or other.status().ready:
                    # a flight whose job is gone (never sent: its submitter died before
                    # sending; or lost with Redis) or finished (its job ends it, but may
                    # have died first) is over: the next submit starts afresh
                    end_flight(self.redis, key, other_id)
                    continue
                return other
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot reach Redis at {self.url}: {exc}") from None
        raise QueueUnavailable(f"could not start or join a flight for {profile_id}")

    def _send(
        self, req: BuildRequest, profile_id: str, job_id: str, key: str, queue: str
    ) -> None:
        try:
            self.app.send_task(
                TASK_NAME,
                kwargs={
                    "request": req.model_dump(mode="json"),
                    "profile_id": profile_id,
                    "submitted_at": time.time(),
                    "flight": key,
                },
                task_id=job_id,
                # what `celery inspect` shows of the job; a repr of the whole request would
                # cost more than the rest of the send
                argsrepr="()",
                kwargsrepr=f"{{profile_id: {profile_id}, repo_dir: {req.repo_dir}}}",
                # to a live host that holds the image, if any (client/hosts.py)
                queue=queue,
            )
        except BaseException as exc:
            # nobody may join a job never sent (Ctrl-C included); if this process dies
            # before it gets here, the job's record expires after send_grace instead
            with contextlib.suppress(redis.RedisError):
                end_flight(self.redis, key, job_id)
            if not isinstance(exc, Exception):
                raise
            raise QueueUnavailable(f"cannot enqueue the build: {exc}") from None
        mark_sent(self.redis, job_id, self.settings)

    def submit_many(self, requests: Iterable[BuildRequest | dict[str, Any]]) -> list[BuildJob]:
        """Submit several requests; identical profiles share one job."""
        return [self.submit(r) for r in requests]
