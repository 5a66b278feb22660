"""A job exists before anyone can join it; a job that no longer exists is reported.

On a fake Redis server (the queue logic) and on a socket that never answers (the bounds).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.errors import JobLost, JobTimeout, QueueUnavailable
from pfbuild.client.jobs import BuildClient
from pfbuild.client.models import JobState
from pfbuild.client.queue import Keys, claim_flight
from pfbuild.client.settings import Settings

PROFILE = {"install_cmds": ["pip install ."], "env": {"A": "1"}}


@pytest.fixture
def client(url: str) -> Iterator[BuildClient]:
    with BuildClient(url, Settings(redis_url=url, send_grace=0.5)) as c:
        yield c


def _req(tmp_path: Path) -> dict[str, Any]:
    return {"repo_dir": str(tmp_path), "profile": PROFILE}


def test_a_sent_job_has_a_record_that_outlives_the_send_grace(client: BuildClient,
                                                              tmp_path: Path) -> None:
    job = client.submit(_req(tmp_path))
    time.sleep(0.7)
    assert client.redis.get(Keys.job(job.id)) == b"sent"
    assert client.submit(_req(tmp_path)).id == job.id  # still joined
    with pytest.raises(JobTimeout):
        job.result(timeout=0.3)


def test_a_flight_never_sent_is_abandoned_after_the_send_grace(client: BuildClient,
                                                               tmp_path: Path) -> None:
    """The submitter died between claiming the flight and sending: joiners get JobLost,
    and a submit after the grace starts a job of its own."""
    first = client.submit(_req(tmp_path))  # only to learn the flight's key
    key = str(first.flight_key)
    client.redis.delete(key)
    assert claim_flight(client.redis, key, "ghost", client.settings) is None  # never sent
    joined = client.submit(_req(tmp_path))
    assert joined.id == "ghost" and joined.joined
    started = time.monotonic()
    assert joined.status().state is JobState.QUEUED  # claimed: it may still be sent
    with pytest.raises(JobLost, match="no longer exists"):
        joined.result(timeout=30)
    assert time.monotonic() - started < 0.5 + 1.5
    assert joined.status().state is JobState.LOST and joined.status().state.ready
    fresh = client.submit(_req(tmp_path))
    assert fresh.id not in ("ghost", first.id) and not fresh.joined


def test_a_wiped_redis_turns_every_waiter_into_job_lost(client: BuildClient,
                                                         tmp_path: Path) -> None:
    job = client.submit(_req(tmp_path))
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.job(job.id).result(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.3)
    client.redis.flushall()
    wiped = time.monotonic()
    for t in waiters:
        t.join(10)
    assert len(errors) == 3 and all(isinstance(e, JobLost) for e in errors), errors
    assert time.monotonic() - wiped < 2


def test_a_redis_that_never_answers_bounds_result() -> None:
    """A server that accepts connections but never replies: result(timeout=2) returns
    (with QueueUnavailable) within 3 s, not after the OS's TCP timeouts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    try:
        with BuildClient(url, Settings(redis_url=url)) as client:
            started = time.monotonic()
            with pytest.raises((QueueUnavailable, JobTimeout)):
                client.job("any").result(timeout=2)
            took = time.monotonic() - started
    finally:
        listener.close()
    print(f"\nresult(timeout=2) against a silent Redis returned after {took:.2f}s")
    assert took < 3


def test_a_look_that_does_not_block_does_not_spin(client: BuildClient, tmp_path: Path) -> None:
    """This fake server's BLMOVE returns at once, as a server without it would refuse it:
    result() then looks at most every 50 ms, not thousands of times a second."""
    job = client.submit(_req(tmp_path))
    looks = 0
    real_poll = job.poll

    def counting(wait: float = 0.0) -> Any:
        nonlocal looks
        looks += 1
        return real_poll(wait)

    job.poll = counting  # type: ignore[method-assign]
    client.blocking_reads = False
    with pytest.raises(JobTimeout):
        job.result(timeout=1)
    assert 5 <= looks <= 30, looks


def test_a_broken_routing_read_sends_to_the_shared_queue(client: BuildClient,
                                                         tmp_path: Path) -> None:
    """A routing read that errors (here a host's image set is the wrong type) means "not
    held": the job is sent as a new profile's would be, instead of the submit failing
    after its claim went through."""
    import json

    from pfbuild.client.hosts import HOSTS, HostKeys, host_queue
    from pfbuild.client.queue import QUEUE

    client.redis.sadd(HOSTS, "b")
    client.redis.set(HostKeys.heartbeat("b"), json.dumps({"concurrency": 2, "engine_ok": True}))
    client.redis.set(HostKeys.images("b"), "not a set")
    job = client.submit(_req(tmp_path))
    assert not job.joined and client.redis.get(Keys.job(job.id)) == b"sent"
    sent = client.redis.lrange(QUEUE, 0, -1) + client.redis.lrange(host_queue("b"), 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in sent] == [job.id]
