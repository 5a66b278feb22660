"""Progress reporting: a job's stage, build step and log lines, as a client sees them.

Stage changes are published at once (as the result backend's custom state, see
:attr:`JobState.celery_state`); progress within a stage at most every 0.5 s. Log lines
go to a Redis list that late joiners read from the start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from kombu.exceptions import OperationalError

from pfbuild.client.models import JobState
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.oplog import log_stage

__all__ = ["Reporter"]

log = logging.getLogger(__name__)

_PUBLISH_EVERY = 0.5  # seconds between two state updates within one stage


class Reporter:
    """A :class:`~pfbuild.worker.build.run.Progress` that publishes through Celery and Redis."""

    def __init__(
        self,
        task: Task,
        redis_client: redis.Redis,
        settings: Settings,
        base: dict[str, Any],
        guard: Callable[[], None] = lambda: None,
    ) -> None:
        self.task = task
        self.redis = redis_client
        self.settings = settings
        self.job_id = str(task.request.id)
        self.base = base
        self.guard = guard
        self.state: JobState | None = None
        self.last_publish = 0.0
        self.lines: list[str] = []
        self.meta: dict[str, Any] = {}
        # what a throttled call would have published, sent by a timer once the interval is
        # over: a build that prints its last lines and then works in silence (a long RUN
        # step) still shows its step, and `pfbuild logs -f` those lines
        self._lock = threading.Lock()
        self._pending: tuple[JobState, dict[str, Any]] | None = None
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, state: JobState, **info: Any) -> None:
        self.guard()  # a build whose lock is gone stops at its next line
        with self._lock:
            if self._closed:
                return
            if "line" in info:
                self.lines.append(str(info["line"]))
            wait = _PUBLISH_EVERY - (time.monotonic() - self.last_publish)
            if state != self.state or wait <= 0:
                self._pending = None
                self._publish(state, **info)
            else:
                self._pending = (state, info)
                if self._timer is None and not self._closed:
                    self._timer = threading.Timer(wait, self._trailing)
                    self._timer.daemon = True
                    self._timer.start()

    def _trailing(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending is not None and not self._closed:
                state, info = self._pending
                self._pending = None
                self._publish(state, **info)

    def publish(self, state: JobState, **info: Any) -> None:
        """Publish ``state`` now."""
        with self._lock:
            self._pending = None
            self._publish(state, **info)

    def close(self) -> None:
        """The job is ending: no trailing publish may follow its final state."""
        with self._lock:
            self._closed = True
            self._pending = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.flush()

    def _publish(self, state: JobState, **info: Any) -> None:
        if state != self.state:  # one searchable line per stage change
            profile_id = str(self.base.get("profile_id"))
            log_stage(self.job_id, profile_id, self.settings.host_id, state.value)
        self.state = state
        self.last_publish = time.monotonic()
        self.flush()
        self.meta = {
            **self.base,
            "stage": state.value,
            **{k: v for k, v in info.items() if v is not None},
        }
        try:
            # by id: a trailing publish runs on a timer thread, outside the task's context
            self.task.update_state(task_id=self.job_id, state=state.celery_state, meta=self.meta)
        except (redis.RedisError, OperationalError) as exc:
            # progress is best effort: a Redis blip must not fail the build itself
            log.warning("job %s: could not publish stage %s: %s", self.job_id, state.value, exc)

    def flush(self) -> None:
        if not self.lines:
            return
        key = Keys.log(self.job_id)
        keep = self.settings.log_keep_lines
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(key, *self.lines)
            pipe.ltrim(key, -keep, -1)
            pipe.expire(key, self.settings.result_expires)
            pipe.execute()
        except redis.RedisError as exc:
            if len(self.lines) < keep:
                return  # keep them for the next flush
            log.warning("job %s: dropped %d log lines: %s", self.job_id, len(self.lines), exc)
        self.lines.clear()
