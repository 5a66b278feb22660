"""A farm on Redis with Sentinel: a master (AOF), a replica and three Sentinels (quorum 2)
on private ports, two real `celery worker` processes and agents (threads with their own
`BuildClient`, and `pfbuild submit --wait` processes) all given the Sentinel URL; the
master is SIGKILLed while four builds run. Prints its figures (run with ``-s``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.jobs import BuildClient, BuildJob
from pfbuild.client.profile import parse_profile
from pfbuild.client.queue import JobState, Keys
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import SentinelSet, Worker
from tests.fakes import nonce_profile
from tests.hostsupport import BuildCounter, delete_from_registry

# one at a time: it times a failover, and its builds should not queue behind others'
pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.xdist_group("sentinel")]

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "hello"
PROFILES, AGENTS = 4, 3  # new profiles building when the master dies, agents for each
BUILD = "sleep 20"  # how long each of them builds
WITHIN = 180.0  # every agent answered within this many seconds of the kill


@pytest.fixture
def farm(docker_engine, registry_addr: str,  # type: ignore[no-untyped-def]
         tmp_path: Path) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    redis_set = SentinelSet(tmp_path / "redis")
    env = {"PFBUILD_REDIS_URL": redis_set.url, "PFBUILD_TMP_DIR": str(tmp_path / "pf"),
           "PFBUILD_METRICS_PORT": "0", "PFBUILD_GC_INTERVAL_SECONDS": "0",
           # a push of the new layers (a fraction of a second) rather than four tarballs
           # of the whole image saved at once (minutes on two cores) after the builds
           "PFBUILD_REGISTRY": registry_addr, "PFBUILD_TARBALL_CACHE": "false"}
    workers: list[Worker] = []
    refs: list[dict[str, Any]] = []
    try:
        for name in ("s1", "s2"):  # two hosts of one engine, two builds at once each
            workers.append(Worker(name, {**env, "PFBUILD_HOST_ID": f"host-{name}"},
                                  tmp_path, concurrency=2))
        for w in workers:
            w.wait_ready()
        yield {"set": redis_set, "env": env, "workers": workers, "refs": refs}
    finally:
        for w in workers:
            w.stop()
        redis_set.stop()
        for ref in refs:
            repository = ref["reference"].split("/", 1)[1].rsplit(":", 1)[0]
            delete_from_registry(registry_addr, repository, ref["digest"])


class _Agent(threading.Thread):
    """One agent: its own client, a submit, then a wait for the answer."""

    def __init__(self, url: str, request: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.request = url, request
        self.job: BuildJob | None = None
        self.submitted = threading.Event()
        self.answer: Any = None
        self.error: BaseException | None = None
        self.at = 0.0

    def run(self) -> None:
        try:
            with BuildClient(self.url) as client:
                self.job = client.submit(self.request)
                self.submitted.set()
                self.answer = self.job.result(timeout=600)
        except BaseException as exc:
            self.error = exc
        finally:
            self.at = time.monotonic()
            self.submitted.set()


def _cli(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pfbuild.client.cli", *args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli_agent(request: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = _cli(["submit", "--wait", "--json"], env, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    proc.stdin = None  # written: communicate() only reads
    return proc


def _until(what: str, check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _start_builds(url: str, env: dict[str, str], repo: Path) -> tuple[list[Any], list[Any]]:
    """Four new profiles, three agents each (one a `pfbuild submit --wait` process, which
    claims the flight; two threads that join it), until all four build."""
    requests = [{"repo_dir": str(repo), "profile": nonce_profile(repo, BUILD)}
                for _ in range(PROFILES)]
    clis = [_cli_agent(req, env) for req in requests]
    r = connect(url, Settings())
    flights = [Keys.flight(parse_profile(req["profile"]).profile_id, False, str(repo))
               for req in requests]

    def sent() -> bool:  # every CLI agent has claimed its flight and sent its job
        holders: list[Any] = [r.get(key) for key in flights]
        records: list[Any] = [r.get(Keys.job(h.decode())) if h else None for h in holders]
        return all(rec in (b"sent", b"running") for rec in records)

    _until("the CLI agents did not send their jobs", sent, 60)
    agents = [_Agent(url, req) for req in requests for _ in range(AGENTS - 1)]
    for a in agents:
        a.start()
    for a in agents:
        assert a.submitted.wait(60) and a.job is not None, a.error
    with BuildClient(url) as client:
        for a in agents[::AGENTS - 1]:
            assert a.job is not None
            job = client.job(a.job.id)
            _until(f"job {job.id} did not start building",
                   lambda job=job: job.status().state is JobState.BUILDING, 120)
    return clis, agents


def _watch_promotion(redis_set: SentinelSet, old: int) -> dict[str, float]:
    seen: dict[str, float] = {}

    def watch() -> None:
        while (port := redis_set.master_port()) in (old, None):
            time.sleep(0.05)
        seen["at"], seen["port"] = time.monotonic(), float(port)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def test_a_master_killed_mid_build_loses_no_agent(farm: dict[str, Any], tmp_path: Path,
                                                  docker_engine: Any,
                                                  cleanup_images: list[str]) -> None:
    redis_set: SentinelSet = farm["set"]
    url, env = redis_set.url, farm["env"]
    repo = tmp_path / "hello"
    shutil.copytree(EXAMPLE, repo)
    with BuildCounter(docker_engine) as counter:
        clis, agents = _start_builds(url, env, repo)
        time.sleep(3)  # mid-build: the four RUN steps sleep
        old = redis_set.master_port()
        assert old == redis_set.data[0]
        redis_set.kill(old)
        killed = time.monotonic()
        promoted = _watch_promotion(redis_set, old)
        outs = [p.communicate(timeout=WITHIN + 60) for p in clis]
        cli_at = time.monotonic()  # no later than this: every CLI agent has answered
        for a in agents:
            a.join(WITHIN + 60)
        answers = [json.loads(out) for out, _ in outs if out.strip()]
        after = _after_the_failover(url, repo, agents[0].request, cleanup_images, farm["refs"])
        time.sleep(1)  # the last build's events
    builds = dict(counter.builds)
    cleanup_images.extend(a["image_tag"] for a in answers)
    farm["refs"].extend(a["manifest"]["registry"] for a in answers if a["manifest"]["registry"])
    errors: list[Any] = [(p.returncode, err[-300:])
                         for p, (_, err) in zip(clis, outs, strict=True) if p.returncode != 0]
    errors += [repr(a.error) for a in agents if a.error is not None]
    times = sorted([a.at - killed for a in agents] + [cli_at - killed])
    ids = {a.answer.profile_id for a in agents if a.answer is not None}
    starts = _starts(url, agents)
    promotion = promoted.get("at", float("nan")) - killed
    first = min(a.at for a in agents) - killed
    print(f"\nSentinel failover mid-build: {PROFILES} profiles x {AGENTS} agents; master "
          f"promoted {promotion:.1f}s after the SIGKILL; first answer after it "
          f"{first:.1f}s after the kill, last {max(times):.1f}s (bound {WITHIN:.0f} s); "
          f"errors {errors}; builds per profile {sorted(builds.get(i, 0) for i in ids)}; "
          f"starts per job {starts}; after: {after}")
    assert not errors and len(answers) == PROFILES
    assert all(a.answer is not None and a.answer.cache_source == "built" for a in agents)
    assert {a["profile_id"] for a in answers} == ids and len(ids) == PROFILES
    assert max(times) < WITHIN and promoted.get("port") == redis_set.data[1]
    assert all(builds.get(i, 0) == 1 for i in ids), builds
    assert all(s == 1 for s in starts.values()), starts  # one start under the lock each
    assert len({a.job.id for a in agents if a.job}) == PROFILES  # one job per profile
    assert after["new_builds"] == 1 and after["new_jobs"] == 1, after
    _old_master_back(redis_set, url, agents[0])


def _starts(url: str, agents: list[_Agent]) -> dict[str, int]:
    r = connect(url, Settings())
    jobs = {a.job.id for a in agents if a.job is not None}
    return {j[:8]: int(r.get(Keys.starts(j)) or 0) for j in jobs}


def _after_the_failover(url: str, repo: Path, old_request: dict[str, Any],
                        cleanup_images: list[str], refs: list[Any]) -> dict[str, Any]:
    """On the new master: a new profile from three agents is built once; an old one hits."""
    request = {"repo_dir": str(repo), "profile": nonce_profile(repo, "true")}
    agents = [_Agent(url, request) for _ in range(AGENTS)]
    with BuildCounter(_engine()) as counter:
        for a in agents:
            a.start()
        for a in agents:
            a.join(300)
        time.sleep(1)
    assert all(a.error is None and a.answer is not None for a in agents), [a.error for a in agents]
    cleanup_images.append(agents[0].answer.image_tag)
    if agents[0].answer.manifest.registry:
        refs.append(agents[0].answer.manifest.registry.model_dump())
    with BuildClient(url) as client:
        hit = client.submit(old_request).result(timeout=120)
    assert hit.cache_source == "local", hit.cache_source
    return {"new_builds": counter.builds[agents[0].answer.profile_id],
            "new_jobs": len({a.job.id for a in agents if a.job}), "old": hit.cache_source}


def _engine() -> Any:
    from pfbuild.worker.engine import DockerEngine

    return DockerEngine(Settings().docker_host_name(), timeout=600)


def _old_master_back(redis_set: SentinelSet, url: str, agent: _Agent) -> None:
    """The old master restarted on its files: the Sentinels make it the new master's
    replica; the farm's answers and its master are unchanged, and the CLI reads the farm
    through the Sentinel URL."""
    new = redis_set.data[1]
    redis_set.start_server(redis_set.data[0])
    started = time.monotonic()
    redis_set.wait_ready(new, timeout=120)
    rejoined = time.monotonic() - started
    assert redis_set.master_port() == new
    assert agent.job is not None
    with BuildClient(url) as client:
        again = client.job(agent.job.id).result(timeout=30)
        hit = client.submit(agent.request).result(timeout=120)
    assert again.image_id == agent.answer.image_id and hit.cache_source == "local"
    env = {"PFBUILD_REDIS_URL": url}
    hosts = json.loads(_cli(["hosts", "--json"], env).communicate(timeout=60)[0])
    top = json.loads(_cli(["top", "--json"], env).communicate(timeout=60)[0])
    alive = sorted(h["host_id"] for h in hosts["hosts"] if h["alive"])
    print(f"old master back as a replica after {rejoined:.1f}s; `pfbuild hosts`: {alive}; "
          f"`pfbuild top`: {len(top['hosts'])} hosts, {top['cache']['answers']} answers")
    assert alive == ["host-s1", "host-s2"]
    assert {h["host_id"] for h in top["hosts"]} >= {"host-s1", "host-s2"}
