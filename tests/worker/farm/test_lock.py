"""The profile lock's logic, on fakeredis: owners, TTL, renewal, loss and fencing."""

from __future__ import annotations

import time

import fakeredis
import pytest

from pfbuild.client.errors import LockLost
from pfbuild.client.queue import Keys
from pfbuild.worker.farm.lock import ProfileLock


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_one_holder_at_a_time_with_increasing_fences(r: fakeredis.FakeRedis) -> None:
    a = ProfileLock(r, "p", ttl=5, owner="a")
    b = ProfileLock(r, "p", ttl=5, owner="b")
    assert a.acquire() and not b.acquire()
    assert a.holder() == a.token and a.token.startswith("a:")
    a.check()
    a.release()
    assert b.acquire() and b.fence is not None and a.fence is not None
    assert b.fence > a.fence
    with pytest.raises(LockLost):
        a.check()  # released: no longer ours


def test_expired_lock_is_lost_and_taken_over(r: fakeredis.FakeRedis) -> None:
    a = ProfileLock(r, "p", ttl=0.3, owner="a")
    assert a.acquire()
    time.sleep(0.5)
    b = ProfileLock(r, "p", ttl=5, owner="b")
    assert b.acquire()
    with pytest.raises(LockLost, match="expired or was taken over"):
        a.check()
    a.release()  # must not free b's lock
    assert r.get(Keys.lock("p")) == b.token.encode()
    b.check()


def test_watchdog_keeps_a_long_build_locked(r: fakeredis.FakeRedis) -> None:
    a = ProfileLock(r, "p", ttl=0.6, owner="a")
    assert a.acquire()
    with a.watchdog():
        time.sleep(1.5)  # 2.5 TTLs
        a.check()
        assert not ProfileLock(r, "p", ttl=5, owner="b").acquire()
    a.release()
    assert r.get(Keys.lock("p")) is None


def test_watchdog_flags_a_lock_taken_from_under_it(r: fakeredis.FakeRedis) -> None:
    a = ProfileLock(r, "p", ttl=0.6, owner="a")
    assert a.acquire()
    with a.watchdog():
        r.delete(Keys.lock("p"))  # as if it had expired during a stall
        b = ProfileLock(r, "p", ttl=5, owner="b")
        assert b.acquire()
        assert a.lost.wait(5)  # the watchdog's next renewal finds it gone
        with pytest.raises(LockLost):
            a.check()
    b.check()


def test_stale_fence_is_refused_even_if_the_token_matches(r: fakeredis.FakeRedis) -> None:
    a = ProfileLock(r, "p", ttl=5, owner="a")
    assert a.acquire()
    r.incr(Keys.fence("p"))  # someone else acquired in between, as far as fences go
    with pytest.raises(LockLost, match="fence"):
        a.check()


def test_a_redis_outage_is_tolerated_only_while_the_ttl_runs() -> None:
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    a = ProfileLock(r, "p", ttl=1.0, owner="a")
    assert a.acquire()
    server.connected = False  # Redis unreachable
    a.check()  # within the TTL: the lock cannot have expired yet, so the build goes on
    time.sleep(1.1)
    with pytest.raises(LockLost, match="cannot reach Redis"):
        a.check()
    a.release()  # must not raise while Redis is down


def test_the_hot_path_check_asks_redis_at_most_once_a_second(r: fakeredis.FakeRedis) -> None:
    """Each build log line checks the lock: 20,000 lines cost a round trip or two, not
    two GETs each."""
    a = ProfileLock(r, "p", ttl=5, owner="a")
    assert a.acquire()
    calls = []
    real = a.client.pipeline

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    a.client.pipeline = counting  # type: ignore[method-assign,assignment]
    started = time.perf_counter()
    for _ in range(20_000):
        a.check_often()
    took = time.perf_counter() - started
    print(f"\n20,000 hot-path lock checks: {took:.3f}s, {len(calls)} Redis round trip(s)")
    assert len(calls) <= 2
    a.lost.set()
    with pytest.raises(LockLost):
        a.check_often()  # a loss the watchdog flagged is seen at once


def test_over_sentinel_a_lock_a_failover_lost_is_taken_back(r: fakeredis.FakeRedis) -> None:
    """A promoted replica may lack the lock (and its fence): the holder takes it back,
    since no newer fence was drawn; the watchdog does the same at its next renewal."""
    a = ProfileLock(r, "p", ttl=0.6, owner="a", failover=True)
    assert a.acquire()  # fakeredis has no WAIT: the holder logs it and goes on
    r.delete(Keys.lock("p"), Keys.fence("p"))  # the promotion lost both
    a.check()
    assert r.get(Keys.lock("p")) == a.token.encode()
    assert int(r.get(Keys.fence("p")) or 0) == a.fence
    with a.watchdog():
        r.delete(Keys.lock("p"))
        time.sleep(0.5)  # past a renewal
        assert not a.lost.is_set()
        assert r.get(Keys.lock("p")) == a.token.encode()
        assert not ProfileLock(r, "p", ttl=5, owner="b").acquire()


def test_over_sentinel_a_lock_someone_took_since_is_not_taken_back(
    r: fakeredis.FakeRedis,
) -> None:
    a = ProfileLock(r, "p", ttl=5, owner="a", failover=True)
    assert a.acquire()
    r.delete(Keys.lock("p"))
    b = ProfileLock(r, "p", ttl=5, owner="b", failover=True)
    assert b.acquire()  # a newer fence
    with pytest.raises(LockLost):
        a.check()
    b.release()  # free again, but b's fence is newer than a's: a stays stopped
    a.lost.clear()
    with pytest.raises(LockLost):
        a.check()
    assert r.get(Keys.lock("p")) is None


def test_without_sentinel_a_missing_lock_is_lost_as_before(r: fakeredis.FakeRedis) -> None:
    """A redis:// lock that vanished (Redis wiped) stops the build, as it always did."""
    a = ProfileLock(r, "p", ttl=5, owner="a")
    assert a.acquire() and not a.failover
    r.delete(Keys.lock("p"), Keys.fence("p"))
    with pytest.raises(LockLost):
        a.check()
