"""Redelivery is idempotent: a copy of a job stored, or running elsewhere, builds nothing.

Eager task runs on a fake Redis server with the fake engine; the unacked hash is kombu's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from pfbuild.client.profile import parse_profile
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.farm.liveness import Heartbeat, Unacked, job_deliveries
from tests.fakes import FakeEngine, eager_worker

PROFILE = {"install_cmds": ["pip install ."], "env": {"B": "2"}}


def _setup(url: str, tmp_path: Path, engine: FakeEngine) -> tuple[Any, Any, dict[str, Any]]:
    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id="h",
                        job_heartbeat_seconds=0.2)
    app, task = eager_worker(settings, url, engine)
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    kwargs = {"request": {"repo_dir": str(repo), "profile": PROFILE, "force_rebuild": False},
              "profile_id": parse_profile(PROFILE).profile_id, "submitted_at": 0.0}
    return app, task, kwargs


def _unacked(r: redis.Redis, job_id: str, tag: str) -> None:
    message = {"headers": {"id": job_id}, "body": "", "properties": {"delivery_tag": tag}}
    r.hset("unacked", tag, json.dumps([message, "", "pfbuild"]))
    r.zadd("unacked_index", {tag: 1.0})


def test_a_copy_whose_answer_is_stored_builds_nothing(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    app, task, kwargs = _setup(url, tmp_path, engine)
    app.backend.store_result("job-a", {"cache_source": "built"}, "SUCCESS")
    result = task.apply(kwargs=kwargs, task_id="job-a")
    assert result.state == "IGNORED" and engine.builds == []
    assert app.backend.get_task_meta("job-a")["result"] == {"cache_source": "built"}
    assert redis.Redis.from_url(url).llen(Keys.done("job-a")) == 1  # waiters woken


def test_a_copy_of_a_job_running_elsewhere_steps_aside(url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    _, task, kwargs = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    r.set(Keys.alive("job-b"), "w9:abc", ex=60)
    _unacked(r, "job-b", "tag-running")
    _unacked(r, "job-b", "tag-copy")
    result = task.apply(kwargs=kwargs, task_id="job-b")
    assert result.state == "IGNORED" and engine.builds == []
    assert r.get(Keys.alive("job-b")) == b"w9:abc"  # the running delivery is left alone


def test_the_last_copy_waits_for_a_silent_run_then_builds(url: str, tmp_path: Path) -> None:
    """The running delivery's message was already handed back: this copy is the job's
    last message, so it keeps it visible and takes over once the heartbeat stops."""
    engine = FakeEngine()
    _, task, kwargs = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    r.set(Keys.alive("job-c"), "w9:dead", px=1500)
    _unacked(r, "job-c", "tag-last")
    started = time.monotonic()
    result = task.apply(kwargs=kwargs, task_id="job-c")
    assert result.state == "SUCCESS" and len(engine.builds) == 1
    assert time.monotonic() - started >= 1.0
    assert (r.zscore("unacked_index", "tag-last") or 0) > 1.0  # kept visible meanwhile
    assert r.get(Keys.alive("job-c")) is None  # released at the end


def test_the_heartbeat_keeps_the_deliveries_of_its_job_fresh(url: str, tmp_path: Path) -> None:
    app, _, _ = _setup(url, tmp_path, FakeEngine())
    r = redis.Redis.from_url(url)
    _unacked(r, "job-d", "tag-d")
    _unacked(r, "other", "tag-other")
    r.set(Keys.job("job-d"), "sent", ex=5)
    assert job_deliveries(r, Unacked(app), "job-d") == [b"tag-d"]
    beat = Heartbeat(r, app, Settings(job_heartbeat_seconds=0.1), "job-d", "w1")
    assert beat.claim() is None
    with beat.running():
        time.sleep(0.35)
        assert r.get(Keys.alive("job-d")) == beat.token.encode()
    assert (r.zscore("unacked_index", "tag-d") or 0) > time.time() - 5
    assert r.zscore("unacked_index", "tag-other") == 1.0
    assert (r.ttl(Keys.job("job-d")) or 0) > 5  # the record lives while the job runs
    assert r.get(Keys.alive("job-d")) is None


def test_a_cancel_seen_mid_build_stops_it_and_stores_no_answer(url: str,
                                                               tmp_path: Path) -> None:
    """The heartbeat sees the cancel flag and aborts; the build stops at its next line,
    REVOKED stays the job's state, and nothing is published (any pool: no process kill)."""
    engine = FakeEngine()
    app, task, kwargs = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)

    def cancelled_meanwhile(dockerfile: str) -> list[str]:
        r.set(Keys.cancel("job-x"), 1)
        app.backend.mark_as_revoked("job-x", reason="cancelled by the client")
        time.sleep(1.0)  # the heartbeat looks for the flag at least every 0.5 s
        return ["Step 1/2 : FROM x", "Step 2/2 : RUN y"]

    engine.build_log = cancelled_meanwhile
    result = task.apply(kwargs=kwargs, task_id="job-x")
    assert result.state == "IGNORED"
    assert app.backend.get_task_meta("job-x")["status"] == "REVOKED"
    assert r.llen(Keys.done("job-x")) == 1
    assert not list((tmp_path / "repo" / ".pf_manifest").rglob("manifest.json"))
    assert not list((tmp_path / "t" / "image-cache").glob("*.tar*"))
    assert r.get(Keys.lock(kwargs["profile_id"])) is None  # released on the way out
