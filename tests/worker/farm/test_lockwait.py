"""Lock waits park the job on a wait list: no message, no retry, woken by the release."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from pfbuild.client.profile import parse_profile
from pfbuild.client.queue import QUEUE, Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.farm.lock import ProfileLock
from pfbuild.worker.farm.lockwait import WaitList, sweep
from tests.fakes import FakeEngine, eager_worker

PROFILE = {"install_cmds": ["pip install ."], "env": {"C": "3"}}


def _setup(url: str, tmp_path: Path, engine: FakeEngine,
           **kw: Any) -> tuple[Any, Any, dict[str, Any], Settings]:
    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id="h", **kw)
    app, task = eager_worker(settings, url, engine)
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    kwargs = {"request": {"repo_dir": str(repo), "profile": PROFILE, "force_rebuild": False},
              "profile_id": parse_profile(PROFILE).profile_id, "submitted_at": 0.0}
    return app, task, kwargs, settings


def _queued_ids(r: redis.Redis) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1)]


def test_a_locked_profile_parks_the_job_and_the_release_sends_it_again(
        url: str, tmp_path: Path) -> None:
    engine = FakeEngine()
    app, task, kwargs, _ = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    holder = ProfileLock(r, kwargs["profile_id"], ttl=60, owner="other")
    assert holder.acquire()
    result = task.apply(kwargs=kwargs, task_id="job-p")
    assert result.state == "IGNORED" and engine.builds == []  # acked, nothing built
    assert app.backend.get_task_meta("job-p")["status"] == "WAITING_FOR_LOCK"
    assert _queued_ids(r) == []  # no retry message, no ETA: nothing on the broker
    assert r.hexists(Keys.waiters(kwargs["profile_id"]), "job-p")
    assert r.get(Keys.alive("job-p")) is None
    # a holder's release wakes the list: the job is sent again, with its wait's start
    holder.release()
    assert WaitList(r, app, kwargs["profile_id"]).wake() == 1
    assert _queued_ids(r) == ["job-p"]
    assert not r.exists(Keys.waiters(kwargs["profile_id"]))
    assert not r.sismember(Keys.waiting(), kwargs["profile_id"])
    body = json.loads(r.lindex(QUEUE, 0) or b"")
    import base64

    _, sent, _ = json.loads(base64.b64decode(body["body"]))
    assert sent["lock_wait_since"] > 0
    again = task.apply(kwargs=sent, task_id="job-p")
    assert again.state == "SUCCESS" and len(engine.builds) == 1
    assert again.result["timings"]["lock_wait"] > 0


def test_the_sweeper_wakes_jobs_of_a_dead_holder_and_overdue_ones(url: str,
                                                                  tmp_path: Path) -> None:
    app, task, kwargs, settings = _setup(url, tmp_path, FakeEngine(), lock_wait_max=1)
    r = redis.Redis.from_url(url)
    pid = kwargs["profile_id"]
    holder = ProfileLock(r, pid, ttl=60, owner="other")
    assert holder.acquire()
    assert task.apply(kwargs=kwargs, task_id="job-s").state == "IGNORED"
    assert sweep(r, app, settings) == 0  # held, not yet overdue
    time.sleep(1.2)
    assert sweep(r, app, settings) == 1  # overdue: sent again, to fail with a clear error
    raw = r.rpop(QUEUE)
    assert isinstance(raw, bytes)
    body = json.loads(raw)
    import base64

    _, sent, _ = json.loads(base64.b64decode(body["body"]))
    late = task.apply(kwargs=sent, task_id="job-s")
    assert late.state == "FAILURE" and late.result.type == "lock_wait_exceeded"
    # a holder that died: its lock expired, nobody released it; the sweep sends the job
    assert task.apply(kwargs={**kwargs, "lock_wait_since": None}, task_id="job-t").state \
        == "IGNORED"
    r.delete(Keys.lock(pid))
    assert sweep(r, app, settings) == 1
    assert _queued_ids(r) == ["job-t"]


def test_a_lock_freed_while_parking_is_taken_at_once(url: str, tmp_path: Path) -> None:
    app, _, kwargs, _ = _setup(url, tmp_path, FakeEngine())
    r = redis.Redis.from_url(url)
    assert not WaitList(r, app, kwargs["profile_id"]).park("job-u", kwargs, "token")
    assert not r.exists(Keys.waiters(kwargs["profile_id"]))
