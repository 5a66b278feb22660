"""`pfbuild submit --wait` on a Redis that no worker consumes says so within seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pfbuild.client.errors import ExitCode
from pfbuild.client.hosts import HOSTS, HostKeys
from pfbuild.client.queue import QUEUE
from pfbuild.worker.bench.localfarm import RedisServer

pytestmark = [pytest.mark.redis]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


def _submit(url: str, repo: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    request = {"repo_dir": str(repo), "profile_path": str(repo / "repo_profile.json")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pfbuild.client.cli", "submit", "--wait", "--json", *flags],
        input=json.dumps(request), capture_output=True, text=True, timeout=60,
        env={**os.environ, "PFBUILD_REDIS_URL": url},
    )
    return proc, time.monotonic() - started


def _warning(stderr: str) -> dict[str, object]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"warning"')]
    assert len(lines) == 1, stderr
    return dict(lines[0]["warning"])


def test_a_submit_no_worker_consumes_is_reported_within_seconds(
        server: RedisServer, hello_repo: Path) -> None:
    proc, took = _submit(server.url, hello_repo)
    assert proc.returncode == ExitCode.QUEUE_UNAVAILABLE, proc.stdout + proc.stderr
    assert took < 10
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "no_workers"
    assert error["details"]["redis_url"] == server.url and error["details"]["waiting"] is False
    warning = _warning(proc.stderr)
    assert warning["type"] == "no_workers" and "no worker consumes" in str(warning["message"])
    # the job stays queued, for workers that come later
    job_id = error["details"]["job_id"]
    assert redis.Redis.from_url(server.url).llen(QUEUE) == 1, job_id


def test_wait_for_workers_warns_and_keeps_waiting(server: RedisServer, hello_repo: Path) -> None:
    proc, took = _submit(server.url, hello_repo, "--wait-for-workers", "--timeout", "5")
    assert proc.returncode == ExitCode.TIMEOUT, proc.stdout + proc.stderr
    assert 5 <= took < 15
    assert _warning(proc.stderr)["details"]["waiting"] is True  # type: ignore[index]


def test_a_live_host_is_a_consumer(server: RedisServer, hello_repo: Path) -> None:
    # a host's heartbeat, as a worker writes it: no warning, the submit waits its time
    r = redis.Redis.from_url(server.url)
    r.sadd(HOSTS, "h1")
    r.set(HostKeys.heartbeat("h1"), json.dumps({"last_seen": time.time()}), ex=30)
    proc, _ = _submit(server.url, hello_repo, "--timeout", "3")
    assert proc.returncode == ExitCode.TIMEOUT, proc.stdout + proc.stderr
    assert "warning" not in proc.stderr
