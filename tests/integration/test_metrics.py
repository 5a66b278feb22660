"""A real worker's /metrics after a build, a hit and a failure; its structured stage lines;
what it told Redis for `pfbuild top`."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pfbuild.client.errors import BuildFailed
from pfbuild.client.jobs import BuildClient
from pfbuild.client.queue import Keys
from pfbuild.worker.bench.localfarm import RedisServer, Worker, free_port

pytestmark = [pytest.mark.docker, pytest.mark.redis]

HOST = f"metrics-host-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def worker_farm(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    workdir = tmp_path_factory.mktemp("metrics-farm")
    server = RedisServer(workdir)
    port = free_port()
    env = {
        "PFBUILD_REDIS_URL": server.url,
        "PFBUILD_TMP_DIR": str(workdir / "pf-tmp"),
        "PFBUILD_HOST_ID": HOST,
        "PFBUILD_METRICS_PORT": str(port),
        "PFBUILD_METRICS_DIR": str(workdir / "metrics"),
        "PFBUILD_LOG_FORMAT": "json",
        "PFBUILD_GC_INTERVAL_SECONDS": "0",
        "PFBUILD_BUILD_SOFT_TIME_LIMIT": "290",
        "PFBUILD_BUILD_TIME_LIMIT": "300",
    }
    # concurrency 2: the prefork pool's children count into files the main process sums
    worker = Worker("m1", env, workdir, concurrency=2)
    try:
        worker.wait_ready()
        yield {"url": server.url, "port": port, "worker": worker}
    finally:
        worker.stop()
        server.stop()


def _request(repo: Path, *cmds: str) -> dict[str, Any]:
    doc = json.loads((repo / "repo_profile.json").read_text())
    doc["env"]["PFTEST_NONCE"] = uuid.uuid4().hex
    doc["install_cmds"] = list(cmds)
    return {"repo_dir": str(repo), "profile": doc}


def _scrape(port: int) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def _settled(port: int, jobs: int) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """Scrape until ``jobs`` jobs are counted and none runs (bounded: the signals follow
    the stored result by milliseconds; 30 s means they never came)."""
    deadline = time.monotonic() + 30
    while True:
        text, samples = _scrape(port)
        counted = sum(v for (name, _), v in samples.items() if name == "pfbuild_jobs_total")
        if (counted >= jobs and _value(samples, "pfbuild_jobs_running") == 0) or \
                time.monotonic() > deadline:
            return text, samples
        time.sleep(0.1)


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_build_a_hit_and_a_failure_are_counted(worker_farm: dict[str, Any], hello_repo: Path,
                                                 cleanup_images: list[str]) -> None:
    url = worker_farm["url"]
    ok = _request(hello_repo, "true")
    with BuildClient(url) as client:
        built = client.submit(ok).result(timeout=600)
        cleanup_images.append(built.image_tag)
        hit = client.submit(ok).result(timeout=60)
        with pytest.raises(BuildFailed) as failed:
            client.submit(_request(hello_repo, "python -c 'raise SystemExit(3)'")).result(timeout=600)
    assert (built.cache_source, hit.cache_source) == ("built", "local")
    assert failed.value.failure is not None

    # Celery stores a job's result, which wakes its client, before it sends the signals
    # the worker counts on: the last job's counts land a moment after its answer
    text, samples = _settled(worker_farm["port"], jobs=3)
    print("\n".join(line for line in text.splitlines() if line.startswith("pfbuild_")
                    and "_bucket" not in line))
    assert _value(samples, "pfbuild_jobs_total", outcome="success", cache_source="built") == 1
    assert _value(samples, "pfbuild_jobs_total", outcome="success", cache_source="local") == 1
    assert _value(samples, "pfbuild_jobs_total", outcome="failure", cache_source="none") == 1
    cls = failed.value.failure.failure_class.value
    assert _value(samples, "pfbuild_job_failures_total", error_type="build_failed",
                  failure_class=cls) == 1
    assert _value(samples, "pfbuild_stage_seconds_count", stage="build") == 1
    assert _value(samples, "pfbuild_stage_seconds_count", stage="total") == 2
    assert _value(samples, "pfbuild_jobs_running") == 0
    # the new image's tarball is saved after its answer, and counted when it lands
    # (bounded by what a save of the image takes on a loaded machine, not a warm cache)
    deadline = time.monotonic() + 300
    while _value(samples, "pfbuild_publishes_total", kind="tarball", outcome="done") < 1:
        assert time.monotonic() < deadline, "the tarball's publication was never counted"
        time.sleep(0.5)
        text, samples = _scrape(worker_farm["port"])
    assert _value(samples, "pfbuild_publish_seconds_count", kind="tarball") == 1
    assert _value(samples, "pfbuild_tarball_bytes_total", direction="written") > 1_000_000
    assert ("pfbuild_queue_depth", frozenset({("queue", "pfbuild")})) in samples

    # one JSON line per stage change, naming job, profile, host and stage
    lines = [json.loads(line) for line in worker_farm["worker"].log.read_text().splitlines()
             if line.startswith("{")]
    stages = [(d["job_id"], d["stage"]) for d in lines if d.get("logger") == "pfbuild.jobs"]
    assert (built.manifest.profile_id, HOST) in {(d["profile_id"], d["host"]) for d in lines}
    built_job = next(d["job_id"] for d in lines if d["profile_id"] == built.profile_id)
    assert [s for j, s in stages if j == built_job][:1] == ["rendering"]
    assert ("building" in [s for j, s in stages if j == built_job])
    assert [s for j, s in stages if j == built_job][-1] == "success"

    # what `pfbuild top` and garbage collection read
    r = redis.Redis.from_url(url, decode_responses=True)
    assert r.zscore(Keys.uses(HOST), built.profile_id) is not None
    recent = [json.loads(x) for x in r.lrange(Keys.failures(), 0, -1)]
    assert [(f["type"], f["failure_class"], f["host"]) for f in recent] == [
        ("build_failed", cls, HOST)]
    assert r.hgetall(Keys.running()) == {}
    assert r.hget(Keys.stats(), "source:local") == "1"
