"""The Celery task's own logic, run eagerly on a fake Redis server with the fake engine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.farm.lock import ProfileLock
from tests.fakes import FakeEngine, eager_worker

PROFILE = {"install_cmds": ["pip install ."], "env": {}}


def _task(url: str, tmp_path: Path, engine: Callable[[], FakeEngine], host_id: str = "h") -> Any:
    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id=host_id, max_deliveries=2)
    return eager_worker(settings, url, engine)[1]


def _setup(url: str, tmp_path: Path, engine: FakeEngine) -> tuple[Any, dict[str, Any], Path]:
    task = _task(url, tmp_path, lambda: engine)
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
    # answered before its publication: the tarball is pending, the lock still held for it
    manifest = result.result["manifest"]
    assert manifest["tarball"] is None and manifest["publications"]["tarball"]["state"] == "pending"
    deadline = time.monotonic() + 30  # the fake engine saves in milliseconds
    while r.get(Keys.lock(kwargs["profile_id"])) is not None:  # released once published
        assert time.monotonic() < deadline
        time.sleep(0.05)
    published = json.loads(r.hget(Keys.publications("job-3"), "tarball") or b"{}")
    assert published["state"] == "done" and Path(published["target"]).is_file()
    on_disk = json.loads(Path(result.result["manifest_path"]).read_text())
    assert on_disk["publications"]["tarball"]["state"] == "done"
    assert on_disk["tarball"]["path"] == published["target"]
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
    from pfbuild.worker.farm import lock as lock_module

    task, kwargs, _ = _setup(url, tmp_path, FakeEngine())

    def blip(self: Any) -> bool:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(lock_module.ProfileLock, "acquire", blip)
    result = task.apply(kwargs=kwargs, task_id="job-6")
    assert result.state == "REJECTED"  # requeued, not failed


def _host(r: Any, host_id: str, *, down: bool = False) -> None:
    from pfbuild.worker.farm.hosts import HostAgent

    engine = FakeEngine()
    engine.down = down
    HostAgent(Settings(host_id=host_id), r, lambda: engine, node=f"w@{host_id}", queues=[],
              concurrency=2).beat()


def _queued(r: Any, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in ``queue``: their headers and kwargs."""
    import base64
    import json

    out = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append({"id": message["headers"]["id"], "kwargs": kwargs})
    return out


def _on_a_host_whose_engine_is_down(url: str, tmp_path: Path) -> tuple[Any, dict[str, Any],
                                                                       redis.Redis]:
    """The task on host h, whose engine is down (and its heartbeat says so)."""
    engine = FakeEngine()
    engine.down = True
    task, kwargs, _ = _setup(url, tmp_path, engine)
    r = redis.Redis.from_url(url)
    _host(r, "h", down=True)
    return task, kwargs, r


def test_a_job_whose_engine_is_down_is_handed_to_a_host_whose_engine_answers(
        url: str, tmp_path: Path) -> None:
    from pfbuild.client.hosts import host_queue
    from pfbuild.client.jobs import BuildClient

    task, kwargs, r = _on_a_host_whose_engine_is_down(url, tmp_path)
    _host(r, "b", down=True)  # live, but its engine is down too: not a target
    _host(r, "a")
    r.set(kwargs["flight"], "job-7")
    result = task.apply(kwargs=kwargs, task_id="job-7")
    assert result.state == "IGNORED"  # acknowledged, no answer stored: the job lives on
    assert r.get(kwargs["flight"]) == b"job-7" and r.get(Keys.job("job-7")) == b"sent"
    (moved,) = _queued(r, host_queue("a"))
    assert moved["id"] == "job-7" and moved["kwargs"]["request"] == kwargs["request"]
    (hop,) = moved["kwargs"]["handed_back"]
    assert hop["from"] == "h" and hop["to"] == "a" and "stopped answering" in hop["reason"]
    status = BuildClient(url).job("job-7").status()
    assert status.stage == "queued" and status.docker_host == "a"
    assert status.line == "engine on host h does not answer; handed to host a"

    # host a's worker (engine up) runs it: the answer says where it came from
    task_a = _task(url, tmp_path, FakeEngine, host_id="a")
    answer = task_a.apply(kwargs=moved["kwargs"], task_id="job-7")
    assert answer.state == "SUCCESS"
    assert "engine on host h does not answer; handed to host a" in \
        answer.result["manifest"]["events"]


def test_with_no_other_answering_host_or_past_the_limit_the_job_fails(
        url: str, tmp_path: Path) -> None:
    from pfbuild.client.errors import EngineUnavailable

    task, kwargs, r = _on_a_host_whose_engine_is_down(url, tmp_path)
    result = task.apply(kwargs=kwargs, task_id="job-8")  # the only host: fails at once
    assert result.state == "FAILURE" and isinstance(result.result, EngineUnavailable)
    _host(r, "a")
    hops = [{"from": "x", "to": "y"}, {"from": "y", "to": "h"}]  # max_handbacks (2) made
    result = task.apply(kwargs={**kwargs, "handed_back": hops}, task_id="job-9")
    assert result.state == "FAILURE" and isinstance(result.result, EngineUnavailable)
    result = task.apply(kwargs={**kwargs, "handed_back": [{"from": "a", "to": "h"}]},
                        task_id="job-10")  # it came from a: never sent back there
    assert result.state == "FAILURE" and isinstance(result.result, EngineUnavailable)


def test_an_unreachable_engine_and_a_forced_rebuild_are_handed_back_too(
        url: str, tmp_path: Path) -> None:
    from pfbuild.client.errors import EngineUnavailable
    from pfbuild.client.hosts import host_queue

    down = FakeEngine()
    down.down = True
    forced_task, kwargs, _ = _setup(url, tmp_path, down)

    def unreachable() -> FakeEngine:
        raise EngineUnavailable("cannot reach the Docker engine at unix:///gone.sock")

    task = _task(url, tmp_path, unreachable)  # no connection at all
    r = redis.Redis.from_url(url)
    _host(r, "a")
    assert task.apply(kwargs=kwargs, task_id="job-11").state == "IGNORED"
    forced = {**kwargs, "request": {**kwargs["request"], "force_rebuild": True}}
    assert forced_task.apply(kwargs=forced, task_id="job-12").state == "IGNORED"  # pinged
    assert [m["id"] for m in _queued(r, host_queue("a"))] == ["job-12", "job-11"]


def test_a_redis_that_never_answers_hands_the_job_back_instead_of_hanging(
        tmp_path: Path) -> None:
    """A worker's own Redis calls time out (worker_redis_socket_timeout): a job that
    cannot reach its lock or records is handed back in about that long, not hung."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    silent = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    try:
        settings = Settings(redis_url=silent, tmp_dir=tmp_path / "t", host_id="h",
                            worker_redis_socket_timeout=0.5)
        _, task = eager_worker(settings, silent, FakeEngine())
        repo = tmp_path / "repo"
        repo.mkdir()
        from pfbuild.client.profile import parse_profile

        kwargs = {"request": {"repo_dir": str(repo), "profile": PROFILE},
                  "profile_id": parse_profile(PROFILE).profile_id, "submitted_at": 0.0}
        started = time.monotonic()
        result = task.apply(kwargs=kwargs, task_id="job-silent")
        took = time.monotonic() - started
    finally:
        listener.close()
    assert result.state == "REJECTED"  # requeued, not failed, not hung
    # the setting's 0.5 s per call (about 2 s in all here), not a library's 5 s default
    assert took < 4


def test_an_answered_copy_whose_engine_is_down_is_not_handed_on(
        url: str, tmp_path: Path) -> None:
    """A copy of a job whose answer is stored (a redelivery) meets a dead engine: it wakes
    the waiters and ends, rather than sending the job to another host to run again."""
    from pfbuild.client.hosts import host_queue

    task, kwargs, r = _on_a_host_whose_engine_is_down(url, tmp_path)
    _host(r, "a")
    task.backend.mark_as_failure("job-10", RuntimeError("the first run failed"))
    result = task.apply(kwargs=kwargs, task_id="job-10")
    assert result.state == "IGNORED"
    assert _queued(r, host_queue("a")) == []
    assert r.lrange(Keys.done("job-10"), 0, -1) == [b"1"]
