"""The hosts registry, routing and rescue of a dead host's jobs, on fakeredis."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from pfbuild.client.hosts import (
    HostKeys,
    choose_queue,
    handback_target,
    host_queue,
    list_hosts,
)
from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import ImageInfo
from pfbuild.worker.farm.hosts import HostAgent, rescue
from tests.fakes import FakeEngine

PROFILE = {"python_version_target": "3.11", "install_cmds": ["true"]}


@pytest.fixture
def r() -> Any:
    return fakeredis.FakeRedis()


def _agent(r: Any, host_id: str, *tags: str, concurrency: int = 2) -> HostAgent:
    engine = FakeEngine()
    for tag in tags:
        engine.images[tag] = ImageInfo(id="sha256:x", labels={})
    settings = Settings(host_id=host_id, docker_host=f"unix:///{host_id}.sock")
    return HostAgent(settings, r, lambda: engine, node=f"w@{host_id}",
                     queues=["pfbuild", host_queue(host_id)], concurrency=concurrency)


def _req() -> BuildRequest:
    return BuildRequest(repo_dir="/r", profile=PROFILE)


def test_heartbeat_lists_hosts_and_the_images_they_hold(r: Any) -> None:
    a = _agent(r, "a", "patchfoundry/p1:latest", "patchfoundry/p2:latest", "other/x:latest")
    a.beat()
    (host,) = list_hosts(r)
    assert host.alive and host.images == ["p1", "p2"] and host.docker_host == "unix:///a.sock"
    engine = a.engine()
    assert isinstance(engine, FakeEngine)
    engine.images.pop("patchfoundry/p1:latest")  # removed by hand: forgotten next beat
    a.beat()
    assert list_hosts(r)[0].images == ["p2"]
    r.delete(HostKeys.heartbeat("a"))  # its TTL ran out
    assert list_hosts(r)[0].alive is False


def test_routing_prefers_a_live_holder_then_the_rendezvous_host(r: Any) -> None:
    settings = Settings()
    assert choose_queue(r, settings, _req(), "p1") == "pfbuild"  # no host known
    _agent(r, "a").beat()
    _agent(r, "b", "patchfoundry/p1:latest").beat()
    assert choose_queue(r, settings, _req(), "p1") == host_queue("b")

    def route(profile_id: str) -> str:
        r.delete(HostKeys.routed("a"), HostKeys.routed("b"))  # as if submitted apart
        return choose_queue(r, settings, _req(), profile_id)

    # a new profile: always the same host for one base image
    first = route("new1")
    assert first in (host_queue("a"), host_queue("b"))
    assert all(route(f"new{i}") == first for i in range(10))
    # the holder is busy: any host (the shared queue)
    r.hset(HostKeys.jobs("b"), mapping={"j1": "x", "j2": "y"})
    assert route("p1") == "pfbuild"
    # the holder is dead: not routed there
    r.delete(HostKeys.jobs("b"))
    r.delete(HostKeys.heartbeat("b"))
    assert route("p1") == host_queue("a")
    assert choose_queue(r, settings.model_copy(update={"routing": False}), _req(), "p1") == \
        "pfbuild"


def test_a_clients_router_reads_the_hosts_once_a_second_and_routes_alike(r: Any) -> None:
    """A submit reads which hosts hold the image in its own round trip; the live hosts it
    reads at most once per max_age, and it routes as choose_queue does."""
    from pfbuild.client.hosts import Router

    router = Router(r, Settings(), max_age=60)
    assert router.live() == []  # read now: no host yet
    _agent(r, "b", "patchfoundry/p1:latest").beat()
    assert router.live() == []  # not read again within max_age
    router.max_age = 0
    pipe = r.pipeline(transaction=False)
    hosts = router.ask(pipe, "p1")
    assert [h.host_id for h in hosts] == ["b"]
    assert router.choose(_req(), hosts, pipe.execute()) == host_queue("b") == \
        choose_queue(r, Settings(), _req(), "p1")
    assert Router(r, Settings(routing=False)).ask(r.pipeline(), "p1") == []


def _message(job: str, queue: str) -> dict[str, Any]:
    return {"body": "e30=", "headers": {"id": job},
            "properties": {"delivery_info": {"exchange": queue, "routing_key": queue},
                           "delivery_tag": job}}


def test_a_dead_hosts_waiting_and_taken_jobs_go_to_the_shared_queue(r: Any) -> None:
    dead = host_queue("b")
    for job in ("j1", "j2"):
        r.lpush(dead, json.dumps(_message(job, dead)))
    r.hset("unacked", "t3", json.dumps([_message("j3", dead), dead, dead]))
    r.set(HostKeys.last_seen("b"), 100.0)
    r.zadd("unacked_index", {"t3": 99.0, "t5": 200.0})
    # taken after b went silent: a live host's delivery, left alone
    r.hset("unacked", "t5", json.dumps([_message("j5", dead), dead, dead]))
    r.hset("unacked", "t4", json.dumps([_message("j4", "pfbuild"), "pfbuild", "pfbuild"]))
    r.hset(HostKeys.jobs("b"), "j3", "p")
    assert rescue(r, "b") == 3
    moved = [json.loads(m) for m in r.lrange("pfbuild", 0, -1)]
    assert sorted(m["headers"]["id"] for m in moved) == ["j1", "j2", "j3"]
    assert all(m["properties"]["delivery_info"] == {"exchange": "", "routing_key": "pfbuild"}
               for m in moved)
    assert r.llen(dead) == 0 and sorted(r.hkeys("unacked")) == [b"t4", b"t5"]
    assert r.zcard("unacked_index") == 1
    assert not r.exists(HostKeys.jobs("b"))
    assert rescue(r, "b") == 0


def test_live_agents_rescue_only_dead_hosts(r: Any) -> None:
    a, b = _agent(r, "a"), _agent(r, "b")
    a.beat()
    b.beat()
    r.lpush(host_queue("b"), json.dumps(_message("j1", host_queue("b"))))
    a.rescue_dead()
    assert r.llen(host_queue("b")) == 1  # b is alive: its queue is its own
    r.delete(HostKeys.heartbeat("b"))
    a.rescue_dead()
    assert r.llen(host_queue("b")) == 0 and r.llen("pfbuild") == 1


def test_pfbuild_hosts_prints_json(url: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    from pfbuild.client.cli import main

    client = redis.Redis.from_url(url)
    _agent(client, "a", "patchfoundry/p1:latest").beat()
    client.hset(HostKeys.jobs("a"), "job1", "p2")
    monkeypatch.setenv("PFBUILD_REDIS_URL", url)
    assert main(["hosts", "--json"]) == 0
    (host,) = json.loads(capsys.readouterr().out)["hosts"]
    assert host["host_id"] == "a" and host["alive"] and host["images"] == ["p1"]
    assert host["running"] == {"job1": "p2"} and host["concurrency"] == 2


def test_jobs_waiting_in_a_hosts_queue_count_as_busy(r: Any) -> None:
    _agent(r, "a", "patchfoundry/p1:latest", concurrency=1).beat()
    r.lpush(host_queue("a"), "{}")  # one job already waits there
    assert choose_queue(r, Settings(), _req(), "new") == "pfbuild"  # a build: elsewhere
    assert choose_queue(r, Settings(), _req(), "p1") == host_queue("a")  # a hit: there


def test_agents_submitting_at_once_do_not_all_land_on_one_idle_host(r: Any) -> None:
    _agent(r, "a", concurrency=2).beat()
    queues = [choose_queue(r, Settings(), _req(), f"new{i}") for i in range(5)]
    assert queues == [host_queue("a")] * 2 + ["pfbuild"] * 3


def _engine(agent: HostAgent) -> FakeEngine:
    engine = agent.engine()
    assert isinstance(engine, FakeEngine)
    return engine


def test_a_host_whose_engine_is_down_is_live_but_routed_nothing(r: Any) -> None:
    a, b = _agent(r, "a"), _agent(r, "b", "patchfoundry/p1:latest")
    a.beat()
    b.beat()
    assert {h.host_id: h.engine_ok for h in list_hosts(r)} == {"a": True, "b": True}
    seen = list_hosts(r)[1].engine_seen
    _engine(b).down = True
    b.beat()
    host_b = list_hosts(r)[1]
    assert host_b.alive and host_b.engine_ok is False and not host_b.routable
    assert host_b.engine_seen == seen and host_b.images == []  # when it last answered
    for i in range(5):  # neither its image (now unknown) nor its base image draws jobs
        r.delete(HostKeys.routed("a"))
        assert choose_queue(r, Settings(), _req(), f"p{i}") == host_queue("a")
    _engine(a).down = True
    a.beat()
    assert choose_queue(r, Settings(), _req(), "p1") == "pfbuild"  # no engine answers
    _engine(b).down = False
    b.beat()  # back within one beat
    assert choose_queue(r, Settings(), _req(), "p1") == host_queue("b")


def test_an_engine_that_cannot_even_be_reached_still_beats(r: Any) -> None:
    from pfbuild.client.errors import EngineUnavailable

    def unreachable() -> FakeEngine:
        raise EngineUnavailable("cannot reach the Docker engine")

    settings = Settings(host_id="c", docker_host="unix:///c.sock")
    HostAgent(settings, r, unreachable, node="w@c", queues=[], concurrency=1).beat()
    (host,) = list_hosts(r)
    assert host.alive and host.engine_ok is False and host.engine_seen is None


def test_a_job_is_handed_to_a_holder_then_to_the_least_loaded_answering_host(r: Any) -> None:
    agents = [_agent(r, h) for h in ("a", "b", "c")]
    for agent in agents:
        agent.beat()
    r.hset(HostKeys.jobs("b"), "j1", "x")  # b runs a job; a and c are idle
    assert handback_target(r, "p1", exclude={"a"}) == "c"
    _agent(r, "b", "patchfoundry/p1:latest").beat()  # b holds the image: a hit there
    assert handback_target(r, "p1", exclude={"a"}) == "b"
    assert handback_target(r, "p1", exclude={"a", "b"}) == "c"
    _engine(agents[2]).down = True
    agents[2].beat()
    assert handback_target(r, "p1", exclude={"a", "b"}) is None  # c's engine is down
    r.delete(HostKeys.heartbeat("b"))
    assert handback_target(r, "p1", exclude={"a"}) is None  # b is dead


def test_a_host_whose_engine_is_down_stops_taking_shared_jobs_while_another_answers(
        r: Any) -> None:
    calls: list[bool] = []
    b = _agent(r, "b")
    b.consume_shared = calls.append
    _engine(b).down = True
    b.beat()
    b.steer()
    assert calls == []  # alone: it keeps taking them, and fails each at once
    a = _agent(r, "a")
    a.beat()
    b.steer()
    b.steer()
    assert calls == [False]  # a answers: shared jobs are a's
    _engine(a).down = True
    a.beat()
    b.steer()
    assert calls == [False, True]  # no engine answers anywhere: back to failing fast
    _engine(a).down = False
    a.beat()
    b.steer()
    _engine(b).down = False
    b.beat()
    b.steer()
    assert calls == [False, True, False, True]  # its engine is back


def test_code_tags_count_as_held_images_and_are_listed(r: Any) -> None:
    # p1's newest build, an older tree's image of p1 (its code tag only), p2 by code only
    a = _agent(r, "a", "patchfoundry/p1:latest", "patchfoundry/p1:0123456789ab",
               "patchfoundry/p2:abcdefabcdef", "patchfoundry/p3:not-a-code")
    a.beat()
    (host,) = list_hosts(r)
    assert host.images == ["p1", "p2"]
    assert host.codes == ["p1:0123456789ab", "p2:abcdefabcdef"]
    engine = a.engine()
    assert isinstance(engine, FakeEngine)
    engine.images.pop("patchfoundry/p2:abcdefabcdef")  # removed by hand: forgotten next beat
    a.beat()
    assert (list_hosts(r)[0].images, list_hosts(r)[0].codes) == (["p1"], ["p1:0123456789ab"])


def test_hits_are_spread_over_the_holders(r: Any) -> None:
    # hits record no running job: equal holders must share them, not the first take all
    _agent(r, "a", "patchfoundry/p1:latest").beat()
    _agent(r, "b", "patchfoundry/p1:latest").beat()
    chosen = {choose_queue(r, Settings(), _req(), "p1") for _ in range(40)}
    assert chosen == {host_queue("a"), host_queue("b")}
