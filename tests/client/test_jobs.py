"""Client logic on a fake Redis server: single flight, states, the reporter's throttle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.errors import BuildFailed, JobTimeout, QueueUnavailable
from pfbuild.client.jobs import BuildClient
from pfbuild.client.queue import JobState, job_state
from pfbuild.client.settings import Settings

PROFILE = {"install_cmds": ["pip install ."], "env": {"A": "1"}}


@pytest.fixture
def client(url: str) -> Iterator[BuildClient]:
    with BuildClient(url, Settings(redis_url=url)) as c:
        yield c


def _req(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {"repo_dir": str(tmp_path), "profile": PROFILE, **kw}


def test_same_profile_joins_one_flight(client: BuildClient, tmp_path: Path) -> None:
    first = client.submit(_req(tmp_path))
    second = client.submit(_req(tmp_path))
    assert second.id == first.id and second.joined and not first.joined
    assert first.status().state is JobState.QUEUED


def test_forced_rebuild_never_joins_an_unforced_flight(client: BuildClient,
                                                       tmp_path: Path) -> None:
    plain = client.submit(_req(tmp_path))
    forced = client.submit(_req(tmp_path, force_rebuild=True))
    assert forced.id != plain.id
    assert client.submit(_req(tmp_path, force_rebuild=True)).id == forced.id


def test_concurrent_submits_make_one_job(client: BuildClient, tmp_path: Path) -> None:
    with ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(lambda _: client.submit(_req(tmp_path)).id, range(50)))
    assert len(ids) == 1
    (_job_id,) = ids
    assert client.redis.llen("pfbuild") == 1  # exactly one message on the queue


def test_failed_flight_fails_every_waiter_then_starts_afresh(client: BuildClient,
                                                            tmp_path: Path) -> None:
    job = client.submit(_req(tmp_path))
    waiter = client.submit(_req(tmp_path))
    client.app.backend.mark_as_failure(job.id, BuildFailed("it broke", build_log_path="/x"))
    for handle in (job, waiter):
        with pytest.raises(BuildFailed, match="it broke") as info:
            handle.result(timeout=1)
        assert info.value.build_log_path == "/x"
    fresh = client.submit(_req(tmp_path))
    assert fresh.id != job.id and not fresh.joined


def test_profile_path_is_read_by_the_client(client: BuildClient, tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps(PROFILE))
    job = client.submit({"repo_dir": str(tmp_path), "profile_path": str(tmp_path / "p.json")})
    assert job.id == client.submit(_req(tmp_path)).id  # same profile, inline or by path
    import base64

    message = json.loads(client.redis.lindex("pfbuild", 0) or b"")
    _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs["request"]["profile"] == PROFILE  # the worker gets it inline
    assert kwargs["request"]["profile_path"] is None


def test_result_timeout_and_status_stage(client: BuildClient, tmp_path: Path) -> None:
    job = client.submit(_req(tmp_path))
    client.app.backend.store_result(job.id, {"stage": "building", "step": 3, "steps": 9,
                                             "line": "Step 3/9 : RUN x"}, "BUILDING")
    st = job.status()
    assert (st.state, st.step, st.steps, st.line) == (JobState.BUILDING, 3, 9, "Step 3/9 : RUN x")
    with pytest.raises(JobTimeout):
        job.result(timeout=0.3)


def test_no_redis_configured_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PFBUILD_REDIS_URL", raising=False)
    with pytest.raises(QueueUnavailable, match="PFBUILD_REDIS_URL"):
        BuildClient(settings=Settings())


@pytest.mark.parametrize(
    ("celery", "ours"),
    [("PENDING", "queued"), ("STARTED", "queued"), ("RETRY", "waiting_for_lock"),
     ("BUILDING", "building"), ("SAVING_TARBALL", "saving_tarball"), ("SUCCESS", "success"),
     ("FAILURE", "failure"), ("REVOKED", "cancelled"), ("WHATEVER", "queued")],
)
def test_state_mapping(celery: str, ours: str) -> None:
    assert job_state(celery).value == ours


def test_stage_states_round_trip() -> None:
    for state in JobState:
        if state not in (JobState.SUCCESS, JobState.FAILURE, JobState.QUEUED,
                         JobState.CANCELLED):
            assert job_state(state.celery_state) is state


def test_result_and_await_return_the_workers_answer(client: BuildClient, tmp_path: Path) -> None:
    import asyncio

    from pfbuild.client.models import BuildRequest
    from tests.fakes import FakeEngine, run_request

    (tmp_path / "setup.py").write_text("")
    job = client.submit(_req(tmp_path))
    answer = run_request(BuildRequest.model_validate(_req(tmp_path)),
                       Settings(tmp_dir=tmp_path / "t", host_id="h"), FakeEngine())
    client.app.backend.store_result(job.id, answer.model_dump(mode="json"), "SUCCESS")
    assert job.result(timeout=1) == answer

    async def both() -> list[Any]:
        return list(await asyncio.gather(job, job.result_async(timeout=1)))

    assert asyncio.run(both()) == [answer, answer]
    assert job.status().state is JobState.SUCCESS


def test_client_sends_absolute_paths(client: BuildClient, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    monkeypatch.chdir(tmp_path)
    client.submit({"repo_dir": ".", "profile": PROFILE, "image_cache_dir": "cache"})
    message = json.loads(client.redis.lindex("pfbuild", 0) or b"")
    _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs["request"]["repo_dir"] == str(tmp_path)
    assert kwargs["request"]["image_cache_dir"] == str(tmp_path / "cache")


def test_a_malformed_request_is_a_bad_request(client: BuildClient) -> None:
    from pfbuild.client.errors import BadRequest

    with pytest.raises(BadRequest, match="force_rebuild"):
        client.submit({"repo_dir": ".", "profile": PROFILE, "force_rebuild": "yes"})
    assert client.redis.llen("pfbuild") == 0  # nothing was queued


def test_every_waiter_wakes_on_the_done_signal_not_the_next_poll(client: BuildClient,
                                                                 tmp_path: Path) -> None:
    import threading
    import time

    from pfbuild.client.queue import signal_done

    job = client.submit(_req(tmp_path))
    woke: list[float] = []

    def wait() -> None:
        with pytest.raises(BuildFailed):
            client.job(job.id).result(timeout=120, poll=60)  # a poll alone would take 60 s
        woke.append(time.monotonic())

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.5)
    signalled = time.monotonic()
    client.app.backend.mark_as_failure(job.id, BuildFailed("boom"))
    signal_done(client.redis, job.id, 60)
    for t in waiters:
        t.join(30)
    assert len(woke) == 3 and max(woke) - signalled < 20


def test_status_shows_the_publications_as_the_publisher_last_said(client: BuildClient,
                                                                  tmp_path: Path) -> None:
    """The answer's own (pending) until the publisher writes the job's hash, then its."""
    from pfbuild.client.queue import Keys

    job = client.submit(_req(tmp_path))
    pending = {"tarball": {"state": "pending", "target": "/c/p+f1.tar.zst"}}
    client.app.backend.mark_as_done(job.id, {"manifest": {"publications": pending}})
    assert job.status().publications["tarball"].state == "pending"
    done = {"state": "done", "target": "/c/p+f1.tar.zst", "seconds": 9.0}
    client.redis.hset(Keys.publications(job.id), "tarball", json.dumps(done))
    shown = job.status().publications["tarball"]
    assert shown.state == "done" and shown.seconds == 9.0
