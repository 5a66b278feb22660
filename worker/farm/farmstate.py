"""What a worker tells Redis about its jobs, for ``pfbuild top`` and garbage collection
(docs/design.md, "Operating the farm").

- ``Keys.running()``: the jobs in a slot now (an entry lives while its job runs; the
  hash expires after the longest build, so a killed worker's entries do not linger);
- ``Keys.failures()``: recent failures, newest first, capped;
- ``Keys.stats()``: answers counted by cache source, failures by class;
- ``Keys.uses(host)``: when each profile's images, and each code's image
  (``{profile_id}:{code}``), were last used on the host (a hit is a use), the order
  garbage collection evicts in. A tarball's use is its mtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from pfbuild.client.errors import PfbuildError
from pfbuild.client.hosts import HostKeys, held_code
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings, is_code

__all__ = ["FAILURES_KEPT", "FarmState"]

log = logging.getLogger(__name__)

FAILURES_KEPT = 200


class FarmState:
    """Records one worker's jobs in Redis; every write is best effort (logged, not raised)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.host = settings.host_id

    def _run(self, what: str, pipe: Any) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record %s: %s", what, exc)

    def started(self, job_id: str, profile_id: str, worker: str) -> None:
        entry = {
            "profile_id": profile_id,
            "host": self.host,
            "worker": worker,
            "since": time.time(),
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(Keys.running(), job_id, json.dumps(entry))
        pipe.expire(Keys.running(), self.settings.build_time_limit)
        pipe.hset(HostKeys.jobs(self.host), job_id, profile_id)  # what routing counts
        self._run("a job's start", pipe)

    def ended(self, job_id: str, answer: dict[str, Any] | None = None) -> None:
        """A job left its slot; with its answer, its image was used now and is held here.
        One round trip for all of it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(Keys.running(), job_id)
        pipe.hdel(HostKeys.jobs(self.host), job_id)
        if answer is not None:
            profile_id = str(answer.get("profile_id"))
            used = {profile_id: time.time()}
            code = str(answer.get("image_tag", "")).rpartition(":")[2]
            if is_code(code):  # the image of this code was used (the codes it holds are
                # read from the engine only: an answer may come after its image's removal)
                used[held_code(profile_id, code)] = used[profile_id]
            pipe.zadd(Keys.uses(self.host), used)
            pipe.hincrby(Keys.stats(), f"source:{answer.get('cache_source')}", 1)
            pipe.sadd(HostKeys.images(self.host), profile_id)
        self._run("a job's end", pipe)
        if answer is not None:
            _touch_tarball(answer)

    def failed(self, job_id: str, profile_id: str, exc: BaseException) -> None:
        kind = exc.type if isinstance(exc, PfbuildError) else "internal_error"
        failure = exc.failure if isinstance(exc, PfbuildError) else None
        entry = {
            "job_id": job_id,
            "profile_id": profile_id,
            "host": self.host,
            "type": kind,
            "failure_class": failure.failure_class.value if failure else None,
            "message": str(exc)[:300],
            "at": time.time(),
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(Keys.failures(), json.dumps(entry))
        pipe.ltrim(Keys.failures(), 0, FAILURES_KEPT - 1)
        pipe.hincrby(Keys.stats(), f"failure:{entry['failure_class'] or kind}", 1)
        self._run("a failure", pipe)

    def forget_images(self, profile_ids: Sequence[str], codes: Sequence[str] = ()) -> None:
        """Images garbage collection removed: no longer used here, no longer held.
        ``profile_ids``: profiles of which no image is left; ``codes``: the code tags
        removed (``{profile_id}:{code}``)."""
        if not profile_ids and not codes:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(Keys.uses(self.host), *profile_ids, *codes)
        if profile_ids:
            pipe.srem(HostKeys.images(self.host), *profile_ids)
        if codes:
            pipe.hdel(HostKeys.codes(self.host), *codes)
        self._run("removed images", pipe)


def _touch_tarball(answer: dict[str, Any]) -> None:
    """A use of a tarball: its mtime is what the tarball cache's LRU reads."""
    tarball = (answer.get("manifest") or {}).get("tarball") or {}
    if tarball.get("path"):
        with contextlib.suppress(OSError):  # gone already: nothing to keep fresh
            os.utime(Path(tarball["path"]))
