"""One lock per ``profile_id`` across every worker and host, held in Redis.

A redis-py ``Lock`` with an owner token (``thread_local=False``, so the watchdog thread
can renew it), a TTL so that a dead worker's lock frees itself, a watchdog that renews it
while the build runs, and a fence number: bumped on every acquisition (and never below
Redis' clock in ms), so that a holder can tell, before each write that matters, whether
someone has taken over since, and a tarball carries the fence it was committed under.

Over Sentinel (client/redisconn.py) the lock must also outlive a failover, whose promoted
replica may lack the master's last writes (replication is asynchronous): a holder waits
(``WAIT``) until a replica has its lock and fence before it builds, and a holder that finds
its lock (or fence) missing while no newer fence was drawn takes it back instead of
stopping, since nobody else can hold it then (docs/design.md, "Redis with Sentinel").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import redis
from redis.exceptions import LockError

from pfbuild.client.errors import LockLost
from pfbuild.client.queue import Keys
from pfbuild.client.redisconn import over_sentinel

__all__ = ["ProfileLock"]


# The next fence: above the last one and at least Redis' clock in milliseconds, so fences
# keep growing even across a Redis that lost its data (a fenced tarball saved before the
# loss never outranks one saved after it).
_NEXT_FENCE = """
local now = redis.call('time')
local clock = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local fence = math.max(tonumber(redis.call('get', KEYS[1]) or '0') + 1, clock)
redis.call('set', KEYS[1], string.format('%d', fence))
return fence
"""


# Take the lock back after a failover lost it, if no newer fence was drawn meanwhile:
# nobody else can hold it then. KEYS: lock, fence; ARGV: token, our fence, TTL in ms.
_REASSERT = """
local fence = tonumber(redis.call('get', KEYS[2]) or '0')
if fence > tonumber(ARGV[2]) then return 0 end
local holder = redis.call('get', KEYS[1])
if holder == false then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3])
elseif holder ~= ARGV[1] then
  return 0
end
redis.call('set', KEYS[2], ARGV[2])
return 1
"""

# How long a new holder waits for a replica to have its lock and fence (Sentinel only):
# replication takes milliseconds; a replica that does not answer in this costs no more.
_REPLICA_WAIT_MS = 1000

log = logging.getLogger(__name__)

_RECHECK_SECONDS = 1.0  # how stale check_often's answer may be (the TTL is far longer)


class ProfileLock:
    def __init__(
        self,
        client: redis.Redis,
        profile_id: str,
        *,
        ttl: float,
        owner: str,
        failover: bool | None = None,
    ) -> None:
        """``failover``: hold the lock across a Sentinel failover (see the module doc);
        default: whether ``client`` reaches Redis through Sentinels."""
        self.client = client
        self.failover = over_sentinel(client) if failover is None else failover
        self.profile_id = profile_id
        self.ttl = ttl
        self.token = f"{owner}:{uuid.uuid4().hex}"
        self.fence: int | None = None
        self.lost = threading.Event()
        self.renewed_at = 0.0  # monotonic time the TTL was last (re)started
        self.checked_at = 0.0  # monotonic time Redis last confirmed the lock
        self._lock = client.lock(Keys.lock(profile_id), timeout=ttl, thread_local=False)

    def acquire(self) -> bool:
        """Take the lock without waiting; on success, draw a fence number."""
        if not self._lock.acquire(blocking=False, token=self.token):
            return False
        self.renewed_at = time.monotonic()
        self.fence = int(self.client.eval(_NEXT_FENCE, 1, Keys.fence(self.profile_id)))
        self.lost.clear()
        if self.failover:
            self._replicate()
        return True

    def _replicate(self) -> None:
        """Wait until a replica has the lock and fence, so a failover keeps them."""
        try:
            acked = int(self.client.wait(1, _REPLICA_WAIT_MS))
        except redis.ResponseError:
            acked = 0  # a server without WAIT: the take-back below is all there is
        if not acked:
            log.warning(
                "lock on %s: no replica confirmed it within %d ms; a failover now may lose it",
                self.profile_id,
                _REPLICA_WAIT_MS,
            )

    def _take_back(self) -> bool:
        """After a failover lost the lock or its fence: take it back if no newer fence
        was drawn (then nobody else holds it). Whether it is ours again."""
        if not self.failover or self.fence is None:
            return False
        keys = (Keys.lock(self.profile_id), Keys.fence(self.profile_id))
        ttl_ms = int(self.ttl * 1000)
        if not self.client.eval(_REASSERT, 2, *keys, self.token, str(self.fence), ttl_ms):
            return False
        self.renewed_at = self.checked_at = time.monotonic()
        log.warning("lock on %s was missing (a failover?); taken back at fence %d",
                    self.profile_id, self.fence)
        return True

    def holder(self) -> str | None:
        """The token of whoever holds the lock now (``owner:random``), if anyone."""
        value = self.client.get(Keys.lock(self.profile_id))
        return value.decode() if isinstance(value, bytes) else value

    def check_often(self) -> None:
        """:meth:`check` for a hot path (each build log line): asks Redis at most every
        ``_RECHECK_SECONDS``, and in between only whether the watchdog flagged a loss.
        The writes others read (tarball, manifest) call :meth:`check` itself."""
        if self.fence is None or self.lost.is_set():
            raise LockLost(f"lost the lock on profile {self.profile_id}; stopped")
        if time.monotonic() - self.checked_at >= _RECHECK_SECONDS:
            self.check()

    def check(self) -> None:
        """Raise LockLost unless this holder still owns the lock and its fence is current
        (one round trip)."""
        if self.fence is None or self.lost.is_set():
            raise LockLost(f"lost the lock on profile {self.profile_id}; stopped")
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(Keys.fence(self.profile_id))
            pipe.get(Keys.lock(self.profile_id))
            current, holder = pipe.execute()
            owned = holder is not None and holder.decode() == self.token
            self.checked_at = time.monotonic()
        except redis.RedisError:
            # Redis cannot tell us; the lock cannot have expired before its TTL has run
            # from the last renewal, so until then the build goes on
            if time.monotonic() - self.renewed_at < self.ttl:
                return
            self.lost.set()
            raise LockLost(f"cannot reach Redis to confirm the lock on {self.profile_id}") from None
        if not owned or current is None or int(current) != self.fence:
            with contextlib.suppress(redis.RedisError):
                if self._take_back():
                    return
            self.lost.set()
            raise LockLost(
                f"the lock on profile {self.profile_id} expired or was taken over "
                f"(fence {self.fence}, now {current!r}); stopped without publishing"
            )

    def release(self) -> None:
        """Release if still ours; a lock that already expired is left alone."""
        # an expired lock is someone else's (or no one's); a Redis outage lets it expire
        with contextlib.suppress(LockError, redis.RedisError):
            self._lock.release()

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[None]:
        """Renew the TTL every third of it while the body runs; flag a failed renewal."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.ttl / 3):
                try:
                    self._lock.reacquire()
                    self.renewed_at = time.monotonic()
                except LockError:  # expired, or someone else's now (or lost in a failover)
                    with contextlib.suppress(redis.RedisError):
                        if self._take_back():
                            continue
                    self.lost.set()
                    return
                except redis.RedisError:
                    # a blip: keep trying while the TTL may still be running
                    if time.monotonic() - self.renewed_at >= self.ttl:
                        self.lost.set()
                        return

        thread = threading.Thread(target=renew, name=f"lock-{self.profile_id[:12]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
