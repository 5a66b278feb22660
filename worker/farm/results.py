"""The worker's result store: a job's result, its waiters woken and its flight ended, in
one round trip to Redis.

Celery's Redis backend reads a task's stored result before it writes a new one (so a late
copy never overwrites a SUCCESS), then writes and publishes it: two round trips, after
which pfbuild's task would wake its waiters in a third. This backend does all of it in one
script, and keeps every final state, not only a SUCCESS: once a job has ended (``SUCCESS``,
``FAILURE`` or ``REVOKED``), no answer, failure or progress stage of a copy still running
lands over it, so every agent of the job reads the same outcome. The results are JSON
(``make_celery``); the script reads the stored state with ``cjson``.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.redis import SentinelBackend

from pfbuild.client.queue import SIGNAL_DONE_LUA, Keys, PollingRedisBackend

__all__ = ["ResultStore", "SentinelResultStore"]

# How long the done list and the job's record stay when results never expire
# (``result_expires`` 0): the signal is read at once, the record is only needed while the
# job may still be waited on.
_SIGNAL_TTL_WHEN_KEPT = 86400

# KEYS: flight ('' for none), done list, job record, result; ARGV: job id, TTL of the
# done list and record, encoded result, its TTL (0: none), 1 if the state is final.
_STORE = (
    """
local ended = false
local current = redis.call('get', KEYS[4])
if current then
  local ok, stored = pcall(cjson.decode, current)
  ended = ok and type(stored) == 'table' and (stored['status'] == 'SUCCESS'
      or stored['status'] == 'FAILURE' or stored['status'] == 'REVOKED')
end
if not ended then
  if tonumber(ARGV[4]) > 0 then
    redis.call('setex', KEYS[4], ARGV[4], ARGV[3])
  else
    redis.call('set', KEYS[4], ARGV[3])
  end
  redis.call('publish', KEYS[4], ARGV[3])
end
if ARGV[5] == '1' then
"""
    + SIGNAL_DONE_LUA
    + """
end
if ended then return 0 end
return 1
"""
)


class ResultStore(PollingRedisBackend):
    """The Redis result backend of pfbuild's workers (see the module docstring)."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        job_id = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        meta["task_id"] = job_id
        flight = (getattr(request, "kwargs", None) or {}).get("flight")
        self.ensure(
            self._run_store,
            (
                job_id,
                self.encode(meta),
                state in states.READY_STATES,
                flight if isinstance(flight, str) else "",
            ),
        )
        return result

    def _run_store(self, job_id: str, value: str | bytes, final: bool, flight: str) -> None:
        ttl = int(self.expires or 0)
        self.client.eval(
            _STORE,
            4,
            flight,
            Keys.done(job_id),
            Keys.job(job_id),
            self.get_key_for_task(job_id),
            job_id,
            ttl or _SIGNAL_TTL_WHEN_KEPT,
            value,
            ttl,
            "1" if final else "0",
        )


class SentinelResultStore(ResultStore, SentinelBackend):  # type: ignore[misc]
    """:class:`ResultStore` over Sentinel (a ``sentinel://`` URL): the same script, run on
    the master the Sentinels name now. A store that fails during a promotion is retried
    (``ensure``) until the new master answers (client/queue.py ``make_celery``)."""
