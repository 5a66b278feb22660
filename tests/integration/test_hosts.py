"""Two real engines, one worker each, a real registry and a real redis-server.

Host A is the default engine, host B the second dockerd of `bash .ci/hosts.sh`.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from pfbuild.client import hosts as routing
from pfbuild.client.hosts import host_queue, list_hosts
from pfbuild.client.jobs import BuildClient, BuildJob
from pfbuild.client.queue import TASK_NAME, Keys, mark_sent
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from tests.conftest import HOST_B_URL, missing
from tests.hostsupport import BuildCounter, delete_from_registry

pytestmark = [pytest.mark.docker, pytest.mark.redis]


@pytest.fixture(scope="module")
def farm(docker_engine, host_b, registry_addr: str,  # type: ignore[no-untyped-def]
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        missing("redis-server")
    work = tmp_path_factory.mktemp("hosts")
    server = RedisServer(work)
    common = {
        "PFBUILD_REDIS_URL": server.url,
        "PFBUILD_REGISTRY": registry_addr,
        "PFBUILD_HEARTBEAT_SECONDS": "1",
        "PFBUILD_HOST_TTL": "4",
        "PFBUILD_LOCK_TTL": "6",
        "PFBUILD_LOCK_POLL_SECONDS": "0.5",
        "PFBUILD_BUILD_SOFT_TIME_LIMIT": "500",
        "PFBUILD_BUILD_TIME_LIMIT": "510",
        "PFBUILD_VISIBILITY_TIMEOUT": "30",
    }
    engines = {"host-a": docker_engine.host, "host-b": HOST_B_URL}
    workers = {
        host: Worker(host, {**common, "PFBUILD_HOST_ID": host, "DOCKER_HOST": url,
                            "PFBUILD_TMP_DIR": str(work / host)}, work, concurrency=2)
        for host, url in engines.items()
    }
    tags: list[str] = []
    refs: list[tuple[str, str]] = []
    try:
        for w in workers.values():
            w.wait_ready()
        r = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 30
        while len([h for h in list_hosts(r) if h.alive]) < 2:
            assert time.monotonic() < deadline, list_hosts(r)
            time.sleep(0.2)
        yield {"url": server.url, "workers": workers, "dir": work, "tags": tags, "refs": refs,
               "redis": r}
    finally:
        for w in workers.values():
            w.stop()
        server.stop()
        for tag in set(tags):
            docker_engine.remove(tag)
            host_b.remove(tag)
        for repository, digest in set(refs):
            delete_from_registry(registry_addr, repository, digest)


def _request(farm: dict[str, Any], *cmds: str) -> dict[str, Any]:
    repo = farm["dir"] / f"repo-{uuid.uuid4().hex[:8]}"
    if not repo.exists():
        shutil.copytree(Path(__file__).parents[2] / "examples" / "hello", repo)
    profile = json.loads((repo / "repo_profile.json").read_text())
    profile["env"]["PFTEST_NONCE"] = uuid.uuid4().hex
    if cmds:
        profile["install_cmds"] = list(cmds)
    return {"repo_dir": str(repo), "profile": profile}


def _keep(farm: dict[str, Any], answer: Any) -> None:
    farm["tags"].append(answer.image_tag)
    if answer.manifest.registry is not None:
        farm["refs"].append((f"patchfoundry/{answer.profile_id}",
                             answer.manifest.registry.digest))


def test_one_profile_sent_to_both_hosts_is_built_once(
    farm: dict[str, Any], docker_engine, host_b  # type: ignore[no-untyped-def]
) -> None:
    """Jobs of one profile sent straight to both hosts' queues at once (no flight to
    join): the lock lets one build, and the other host answers from the registry."""
    request = _request(farm)
    with BuildClient(farm["url"]) as client, BuildCounter(docker_engine) as a, \
            BuildCounter(host_b) as b:
        req, profile_id = client._prepare(request)
        jobs = []
        for host in ("host-a", "host-b", "host-a", "host-b"):
            job_id = str(uuid.uuid4())
            client.app.send_task(TASK_NAME, task_id=job_id, queue=host_queue(host), kwargs={
                "request": req.model_dump(mode="json"), "profile_id": profile_id,
                "submitted_at": time.time()})
            mark_sent(client.redis, job_id, client.settings)  # it exists: waiters wait
            jobs.append(BuildJob(client, job_id, profile_id))
        answers = [j.result(timeout=600) for j in jobs]
        time.sleep(1)  # the last events
    for answer in answers:
        _keep(farm, answer)
    assert a.builds[profile_id] + b.builds[profile_id] == 1, (a.builds, b.builds)
    sources = sorted(x.cache_source for x in answers)
    assert sources.count("built") == 1, sources
    assert {x.docker_host for x in answers} == {"host-a", "host-b"}
    builder = next(x.docker_host for x in answers if x.cache_source == "built")
    other = [x for x in answers if x.docker_host != builder]
    assert other and all(x.cache_source in ("registry", "local") for x in other)
    assert "registry" in sources  # the other host fetched it without a build
    assert len({x.image_id for x in answers}) == 1
    # both hosts now say they hold it, and a new submit is routed to one of them
    deadline = time.monotonic() + 10
    while not all(profile_id in h.images for h in list_hosts(farm["redis"])):
        assert time.monotonic() < deadline, list_hosts(farm["redis"])
        time.sleep(0.2)
    with BuildClient(farm["url"]) as client:
        again = client.submit(request).result(timeout=60)
    assert again.cache_source == "local"


def test_a_host_killed_while_holding_routed_jobs_loses_none(
    farm: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three jobs routed to host B (one running, one prefetched, one waiting in its
    queue); B's worker is killed; host A runs all three."""
    monkeypatch.setattr(routing.Router, "choose", lambda *a, **k: host_queue("host-b"))
    with BuildClient(farm["url"]) as client:
        jobs = [client.submit(_request(farm, f"sleep {20 + i}")) for i in range(3)]
        deadline = time.monotonic() + 300
        while not any(j.status().docker_host == "host-b" for j in jobs):
            assert time.monotonic() < deadline, [j.status() for j in jobs]
            time.sleep(0.2)
        farm["workers"]["host-b"].kill()
        killed_at = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda j: j.result(timeout=600), jobs))
    for answer in answers:
        _keep(farm, answer)
    assert all(a.docker_host == "host-a" for a in answers), [a.docker_host for a in answers]
    assert all(a.cache_source == "built" for a in answers)
    assert time.monotonic() - killed_at < 300  # not after a visibility timeout
    r = farm["redis"]
    host_b = next(h for h in list_hosts(r) if h.host_id == "host-b")
    assert not host_b.alive
    deadline = time.monotonic() + 10  # lock retries may pass by its queue: moved each beat
    while r.llen(host_queue("host-b")):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert all(int(r.get(Keys.starts(j.id)) or 0) <= 2 for j in jobs)


def test_a_host_asking_for_a_profile_another_still_publishes_gets_the_publication(
    farm: dict[str, Any], docker_engine, host_b  # type: ignore[no-untyped-def]
) -> None:
    """Host A answers a new profile and publishes it (registry push, then its tarball);
    host B is asked for the profile while A still publishes: B waits on the profile lock
    A's publisher holds, and is answered from the registry once the publication has
    landed. One build in all."""
    request = _request(farm)
    with BuildClient(farm["url"]) as client, BuildCounter(docker_engine) as a, \
            BuildCounter(host_b) as b:
        req, profile_id = client._prepare(request)

        def send(host: str) -> BuildJob:
            job_id = str(uuid.uuid4())
            client.app.send_task(TASK_NAME, task_id=job_id, queue=host_queue(host), kwargs={
                "request": req.model_dump(mode="json"), "profile_id": profile_id,
                "submitted_at": time.time()})
            mark_sent(client.redis, job_id, client.settings)
            return BuildJob(client, job_id, profile_id)

        job_a = send("host-a")
        on_a = job_a.result(timeout=600)
        job_b = send("host-b")
        asked_while = job_a.status().publications
        on_b = job_b.result(timeout=600)
        deadline = time.monotonic() + 600  # A's publications land (a niced save)
        after = job_a.status().publications
        while not all(p.state == "done" for p in after.values()) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
            after = job_a.status().publications
        time.sleep(1)  # the last events
    for answer in (on_a, on_b):
        _keep(farm, answer)
    print(f"\nhost B asked while A published {dict((k, v.state) for k, v in asked_while.items())}"
          f"; B answered from {on_b.cache_source}; A's publications then "
          f"{dict((k, (v.state, v.seconds)) for k, v in after.items())}; builds A "
          f"{a.builds[profile_id]}, B {b.builds[profile_id]}")
    assert on_a.cache_source == "built" and on_a.docker_host == "host-a"
    assert asked_while["tarball"].state == "pending"  # B asked during the publication
    # B waits on A's publisher and pulls what it pushed, or B's job is steered to A, which
    # holds the image by then (a hit there): never a second build
    assert (on_b.docker_host, on_b.cache_source) in {("host-b", "registry"), ("host-a", "local")}
    assert on_b.image_id == on_a.image_id
    assert all(p.state == "done" for p in after.values()) and set(after) == {"registry",
                                                                             "tarball"}
    assert a.builds[profile_id] + b.builds[profile_id] == 1
