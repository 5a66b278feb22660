"""The Celery task's own logic, run eagerly on a fake Redis server with the fake engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.lock import ProfileLock
from tests.fakes import FakeEngine, eager_worker

PROFILE = {"install_cmds": ["pip install ."], "env": {}}


def _setup(url: str, tmp_path: Path, engine: FakeEngine) -> tuple[Any, dict[str, Any], Path]:
    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id="h", max_deliveries=2)
    _, task = eager_worker(settings, url, engine)
    repo = tmp_path / "repo"
    repo.mkdir()
    from pfbuild.client.profile import parse_profile

    kwargs = {"request": {"repo_dir": str(repo), "profile": PROFILE, "force_rebuild": False},
              "profile_id": parse_profile(PROFILE).profile_id, "submitted_at": 0.0}
    kwargs["flight"] = Keys.flight(str(kwargs["profile_id"]), False, str(repo))
    return task, kwargs, repo


def test_a_build_that_loses_its_lock_publishes_nothing(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    task, kwargs, repo = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    pid = kwargs["profile_id"]

    def steal(dockerfile: str) -> list[str]:
        r.delete(Keys.lock(pid))  # our lock expired during a stall...
        assert ProfileLock(r, pid, ttl=30, owner="thief").acquire()  # ...and was taken
        return ["Step 1/2 : FROM x", "Step 2/2 : RUN y"]

    engine.build_log = steal
    r.set(kwargs["flight"], "job-1")
    result = task.apply(kwargs=kwargs, task_id="job-1")
    assert r.get(kwargs["flight"]) == b"job-1"  # the flight goes on
    assert result.state == "REJECTED"  # requeued, not failed: no flight is ended
    assert not list((repo / ".pf_manifest").rglob("manifest.json"))
    assert not list((tmp_path / "t" / "image-cache").glob("*.tar*"))


def test_redelivery_cap_fails_the_job_with_a_clear_error(url: str, tmp_path: Path) -> None:
    task, kwargs, _ = _setup(url, tmp_path, FakeEngine())
    redis.Redis.from_url(url).set(Keys.starts("job-2"), 2)  # two earlier starts died
    result = task.apply(kwargs=kwargs, task_id="job-2")
    assert result.state == "FAILURE"
    assert "giving up" in str(result.result)


def test_success_returns_the_answer_and_ends_the_flight(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    task, kwargs, _ = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    r.set(kwargs["flight"], "job-3")
    result = task.apply(kwargs=kwargs, task_id="job-3")
    assert result.state == "SUCCESS" and result.result["cache_source"] == "built"
    assert result.result["docker_host"] == "h" and result.result["manifest"]["worker"]
    assert r.get(kwargs["flight"]) is None
    assert r.get(Keys.lock(kwargs["profile_id"])) is None  # released
    assert int(r.get(Keys.starts("job-3")) or 0) == 1


def test_a_cancelled_job_never_builds(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    task, kwargs, _ = _setup(url, tmp_path, engine)
    redis.Redis.from_url(url).set(Keys.cancel("job-4"), 1)
    result = task.apply(kwargs=kwargs, task_id="job-4")
    assert result.state == "IGNORED" and engine.builds == []


def test_relative_paths_are_refused_by_the_worker(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    task, kwargs, _ = _setup(url, tmp_path, engine)
    kwargs["request"]["repo_dir"] = "repo"
    result = task.apply(kwargs=kwargs, task_id="job-5")
    assert result.state == "FAILURE" and "absolute" in str(result.result)
    assert result.result.type == "bad_request" and engine.builds == []


def test_a_redis_blip_outside_the_build_hands_the_job_back(url: str, tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    from pfbuild.worker import lock as lock_module

    task, kwargs, _ = _setup(url, tmp_path, FakeEngine())

    def blip(self: Any) -> bool:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(lock_module.ProfileLock, "acquire", blip)
    result = task.apply(kwargs=kwargs, task_id="job-6")
    assert result.state == "REJECTED"  # requeued, not failed
