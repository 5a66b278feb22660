"""Operating hooks of a worker, on Celery's signals (docs/design.md, "Operating the farm").

The task stays a thin shell: what an operator sees of a job (metrics, the farm state
``pfbuild top`` reads, the structured stage lines, the uses garbage collection orders
by) is recorded here, from the signals Celery sends around each build job. The worker's
main process prepares the metrics folder before its pool forks, then serves
``/metrics`` and runs the periodic garbage collection.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from pfbuild.client.errors import EngineError, PfbuildError
from pfbuild.client.models import Publication
from pfbuild.client.queue import TASK_NAME
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings
from pfbuild.worker import oplog, publish
from pfbuild.worker.farm.farmstate import FarmState
from pfbuild.worker.ops import metrics as m

__all__ = ["install", "observe_answer", "observe_failure", "observe_publication"]


def observe_answer(answer: dict[str, Any]) -> None:
    """Count a job's answer: outcome, cache source, seconds per stage, retries, bytes."""
    metrics = m.metrics()
    source = str(answer.get("cache_source") or "none")
    metrics.jobs.labels("success", source).inc()
    for stage, seconds in (answer.get("timings") or {}).items():
        if seconds or stage == "total":
            metrics.stage_seconds.labels(stage).observe(float(seconds))
    _observe_retries(answer.get("attempts") or [], last_failed=False)
    manifest = answer.get("manifest") or {}
    tarball = manifest.get("tarball") or {}
    if tarball.get("size") and source in ("tarball", "built"):
        direction = "read" if source == "tarball" else "written"
        metrics.tarball_bytes.labels(direction).inc(int(tarball["size"]))
    registry = manifest.get("registry") or {}
    if registry.get("bytes") and source in ("registry", "built"):
        direction = "read" if source == "registry" else "written"
        metrics.registry_bytes.labels(direction).inc(int(registry["bytes"]))


def observe_publication(kind: str, publication: Publication) -> None:
    """Count a publication that finished (worker/publish.py), its seconds and bytes (a
    new image's answer goes out before its tarball: its bytes are counted here)."""
    metrics = m.metrics()
    metrics.publishes.labels(kind, publication.state).inc()
    if publication.seconds is not None:
        metrics.publish_seconds.labels(kind).observe(publication.seconds)
    if publication.state == "done" and publication.bytes:
        moved = metrics.tarball_bytes if kind == "tarball" else metrics.registry_bytes
        moved.labels("written").inc(publication.bytes)


def _observe_retries(attempts: list[dict[str, Any]], *, last_failed: bool) -> None:
    """Each failed attempt another followed was a retry of the ladder."""
    retried = attempts[:-1] if last_failed else attempts
    for attempt in retried:
        failure = attempt.get("failure") or {}
        if not attempt.get("ok"):
            cls = failure.get("failure_class", "unknown")
            m.metrics().ladder_retries.labels(cls).inc()


def observe_failure(exc: BaseException) -> None:
    """Count a failed job by error type and failure class (engine errors apart)."""
    metrics = m.metrics()
    kind = exc.type if isinstance(exc, PfbuildError) else "internal_error"
    failure = exc.failure if isinstance(exc, PfbuildError) else None
    cls = failure.failure_class.value if failure else "none"
    metrics.jobs.labels("failure", "none").inc()
    metrics.failures.labels(kind, cls).inc()
    if isinstance(exc, EngineError):
        metrics.engine_errors.labels(kind).inc()
    if isinstance(exc, PfbuildError):
        _observe_retries(exc.details.get("attempts") or [], last_failed=True)


class _Hooks:
    """The signal handlers of one app (signals are global: each checks its sender)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._state: tuple[int, FarmState] | None = None
        self.gc: Any = None

    def ours(self, sender: Any) -> bool:
        return (
            getattr(sender, "name", None) == TASK_NAME and getattr(sender, "app", None) is self.app
        )

    @property
    def state(self) -> FarmState:
        """One Redis client per process (pool children are forked)."""
        if self._state is None or self._state[0] != os.getpid():
            client = connect(self.app.conf.broker_url, self.settings, socket_timeout=5)
            self._state = (os.getpid(), FarmState(client, self.settings))
        return self._state[1]

    def prerun(self, sender: Any = None, **_: Any) -> None:
        # the job's record in Redis is written by the task once it is past the hit path
        # (a hit is answered before a record would be read), and removed here at its end
        if self.ours(sender):
            m.metrics().running.inc()

    def postrun(
        self,
        sender: Any = None,
        task_id: str = "",
        retval: Any = None,
        state: str = "",
        **_: Any,
    ) -> None:
        if self.ours(sender):
            m.metrics().running.dec()
            answered = state == "SUCCESS" and isinstance(retval, dict)
            self.state.ended(task_id, retval if answered else None)

    def success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        if self.ours(sender) and isinstance(result, dict):
            observe_answer(result)  # its records in Redis are written with its end
            oplog.log_stage(
                str(sender.request.id),
                str(result.get("profile_id")),
                self.settings.host_id,
                "success",
                cache_source=result.get("cache_source"),
            )

    def failure(
        self,
        sender: Any = None,
        task_id: str = "",
        exception: Any = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        if self.ours(sender) and isinstance(exception, BaseException):
            observe_failure(exception)
            self.state.failed(task_id, _profile(kwargs), exception)
            kind = exception.type if isinstance(exception, PfbuildError) else "internal_error"
            oplog.log_stage(task_id, _profile(kwargs), self.settings.host_id, "failure", error=kind)

    def retry(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if self.ours(sender):
            m.metrics().lock_waits.inc()  # the build task retries only to wait for a lock

    def revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if self.ours(sender):
            m.metrics().jobs.labels("cancelled", "none").inc()
            job_id = str(getattr(request, "id", ""))
            self.state.ended(job_id)  # a terminated job's process ran no postrun
            oplog.log_stage(
                job_id,
                _profile(getattr(request, "kwargs", None)),
                self.settings.host_id,
                "cancelled",
            )

    def worker_init(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app and self.settings.metrics_port:
            m.prepare(self.settings)

    def worker_ready(self, sender: Any = None, **_: Any) -> None:
        url = str(self.app.conf.broker_url)
        if getattr(sender, "app", None) is not self.app:
            return
        m.serve(self.settings, url)
        if self.settings.gc_interval_seconds > 0:
            from pfbuild.worker.ops.gc import PeriodicGc

            self.gc = PeriodicGc(self.settings, url)
            self.gc.start()

    def worker_shutdown(self, **_: Any) -> None:
        if self.gc is not None:
            self.gc.stop()

    def process_shutdown(self, pid: int = 0, **_: Any) -> None:
        m.process_exited(pid or os.getpid())


def _profile(kwargs: Any) -> str:
    return str((kwargs or {}).get("profile_id", ""))


def install(app: Celery, settings: Settings) -> None:
    """Connect the operating hooks to ``app``'s build jobs and worker."""
    hooks = _Hooks(app, settings)  # weak=False below: the signals keep it alive
    oplog.configure(settings.log_format)
    publish.observe(observe_publication)  # once per process, however many apps
    signals.task_prerun.connect(hooks.prerun, weak=False)
    signals.task_postrun.connect(hooks.postrun, weak=False)
    signals.task_success.connect(hooks.success, weak=False)
    signals.task_failure.connect(hooks.failure, weak=False)
    signals.task_retry.connect(hooks.retry, weak=False)
    signals.task_revoked.connect(hooks.revoked, weak=False)
    signals.worker_init.connect(hooks.worker_init, weak=False)
    signals.worker_ready.connect(hooks.worker_ready, weak=False)
    signals.worker_shutdown.connect(hooks.worker_shutdown, weak=False)
    signals.worker_process_shutdown.connect(hooks.process_shutdown, weak=False)
