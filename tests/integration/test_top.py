"""`pfbuild top --json` on a farm under load: hosts, running jobs with their stage, queue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.jobs import BuildClient
from pfbuild.worker.bench.localfarm import RedisServer, Worker

pytestmark = [pytest.mark.docker, pytest.mark.redis]


@pytest.fixture
def loaded_farm(docker_engine, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    server = RedisServer(tmp_path)
    hosts = [f"top-{uuid.uuid4().hex[:6]}-{i}" for i in (1, 2)]
    workers = [
        Worker(f"t{i}", {"PFBUILD_REDIS_URL": server.url, "PFBUILD_TMP_DIR": str(tmp_path / "pf"),
                         "PFBUILD_HOST_ID": host, "PFBUILD_METRICS_PORT": "0",
                         "PFBUILD_GC_INTERVAL_SECONDS": "0"}, tmp_path)
        for i, host in enumerate(hosts)
    ]
    try:
        for w in workers:
            w.wait_ready()
        yield {"url": server.url, "hosts": hosts}
    finally:
        for w in workers:
            w.stop()
        server.stop()


def _top(url: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pfbuild.client.cli", "top", "--json"],
                         env={**os.environ, "PFBUILD_REDIS_URL": url}, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_top_shows_hosts_running_jobs_and_queue_depth(loaded_farm: dict[str, Any],
                                                     hello_repo: Path) -> None:
    doc = json.loads((hello_repo / "repo_profile.json").read_text())
    requests = []
    for _ in range(5):  # two slots, five jobs: two build, three wait in the queue
        profile = {**doc, "env": {**doc["env"], "PFTEST_NONCE": uuid.uuid4().hex},
                   "install_cmds": ["sleep 600"]}
        requests.append({"repo_dir": str(hello_repo), "profile": profile})
    with BuildClient(loaded_farm["url"]) as client:
        jobs = [client.submit(r) for r in requests]
        try:
            deadline = time.monotonic() + 120
            view = _top(loaded_farm["url"])
            # until both builds have reported a step of their Dockerfile
            while [(j["stage"], bool(j["step"])) for j in view["running"]] != [
                    ("building", True)] * 2:
                assert time.monotonic() < deadline, json.dumps({k: view[k] for k in ("running", "queues", "hosts")})
                time.sleep(0.5)
                view = _top(loaded_farm["url"])
        finally:
            for job in jobs:
                job.cancel()
    from rich.console import Console

    from pfbuild.client.top import render

    console = Console(record=True, width=110)
    console.print(render(view))
    print(json.dumps({k: view[k] for k in ("hosts", "queue_depth", "running")}, indent=1))
    assert view["queue_depth"] == 3
    assert {j["host"] for j in view["running"]} == set(loaded_farm["hosts"])
    assert {j["job_id"] for j in view["running"]} <= {j.id for j in jobs}
    assert all(j["steps"] and j["step"] for j in view["running"])
    assert set(loaded_farm["hosts"]) <= {h["host_id"] for h in view["hosts"]}
