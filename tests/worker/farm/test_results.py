"""The worker's result store: a final result wakes the waiters and ends the flight in the
same step; nothing lands over an answer or a cancellation; a hit leaves no job record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from pfbuild.client.profile import parse_profile
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from tests.fakes import FakeEngine, eager_worker

PROFILE = {"install_cmds": ["pip install ."], "env": {"R": "1"}}


def _worker(url: str, tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id="h")
    app, task = eager_worker(settings, url, FakeEngine())
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    profile_id = parse_profile(PROFILE).profile_id
    kwargs = {"request": {"repo_dir": str(repo), "profile": PROFILE, "force_rebuild": False},
              "profile_id": profile_id, "submitted_at": 0.0,
              "flight": Keys.flight(profile_id, False, str(repo))}
    return app, task, kwargs


def _status(r: redis.Redis, job_id: str) -> str:
    return str(json.loads(r.get(f"celery-task-meta-{job_id}") or "{}").get("status"))


def test_a_hit_is_stored_with_its_wake_up_and_its_flight_ended(url: str, tmp_path: Path) -> None:
    _, task, kwargs = _worker(url, tmp_path)
    r = redis.Redis.from_url(url)
    assert task.apply(kwargs=kwargs, task_id="build-1").result["cache_source"] == "built"
    r.set(kwargs["flight"], "hit-1")
    hit = task.apply(kwargs=kwargs, task_id="hit-1")
    assert hit.result["cache_source"] == "local"
    assert _status(r, "hit-1") == "SUCCESS"
    assert r.lrange(Keys.done("hit-1"), 0, -1) == [b"1"]  # its waiters woken
    assert r.get(kwargs["flight"]) is None  # and its flight over, in the same step
    assert 0 < r.ttl(Keys.done("hit-1")) <= Settings().result_expires
    # the build was recorded in a slot (its end is the signal handler's); the hit never
    running = r.hkeys(Keys.running())
    assert b"build-1" in running and b"hit-1" not in running


def test_a_flight_of_another_job_is_left_alone(url: str, tmp_path: Path) -> None:
    _, task, kwargs = _worker(url, tmp_path)
    r = redis.Redis.from_url(url)
    r.set(kwargs["flight"], "newer-job")
    task.apply(kwargs=kwargs, task_id="old-job")
    assert r.get(kwargs["flight"]) == b"newer-job"
    assert r.lrange(Keys.done("old-job"), 0, -1) == [b"1"]


def test_nothing_lands_over_a_final_state(url: str, tmp_path: Path) -> None:
    app, _, _ = _worker(url, tmp_path)
    r = redis.Redis.from_url(url)
    backend = app.backend
    backend.mark_as_revoked("c-1", reason="cancelled by the client")
    backend.mark_as_done("c-1", {"cache_source": "built"})  # a copy that went on
    backend.store_result("c-1", {"stage": "building"}, "BUILDING")  # a late progress stage
    assert _status(r, "c-1") == "REVOKED"
    backend.mark_as_done("d-1", {"cache_source": "local"})
    backend.mark_as_failure("d-1", RuntimeError("a late copy failed"))
    assert _status(r, "d-1") == "SUCCESS"
    assert r.lrange(Keys.done("d-1"), 0, -1) == [b"1"]  # woken, once in the list
    backend.mark_as_failure("f-1", RuntimeError("the build failed"))
    backend.mark_as_done("f-1", {"cache_source": "local"})  # a copy that was a hit
    backend.store_result("f-1", {"stage": "queued"}, "QUEUED")  # a copy handed on
    assert _status(r, "f-1") == "FAILURE"  # every agent of the job reads one outcome


def test_a_stage_that_is_not_final_wakes_nobody(url: str, tmp_path: Path) -> None:
    app, _, _ = _worker(url, tmp_path)
    r = redis.Redis.from_url(url)
    app.backend.store_result("p-1", {"stage": "building"}, "BUILDING")
    assert _status(r, "p-1") == "BUILDING"
    assert not r.exists(Keys.done("p-1"))


def test_a_cancelled_job_that_would_be_a_hit_stays_cancelled(url: str, tmp_path: Path) -> None:
    """The hit path reads nothing of Redis first: the store keeps the cancellation."""
    app, task, kwargs = _worker(url, tmp_path)
    r = redis.Redis.from_url(url)
    task.apply(kwargs=kwargs, task_id="build-2")
    r.set(Keys.cancel("c-2"), 1)
    app.backend.mark_as_revoked("c-2", reason="cancelled by the client")
    task.apply(kwargs=kwargs, task_id="c-2")
    assert _status(r, "c-2") == "REVOKED"
    assert r.lrange(Keys.done("c-2"), 0, -1) == [b"1"]
