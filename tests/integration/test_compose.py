"""The compose farm as the README runs it, beside what .ci/setup started (its Redis on
127.0.0.1:6379, the registry of .ci/hosts.sh): `docker-compose up --build`, a repository
under /srv/repos submitted with the README's command, built by a compose worker and pushed
to the compose registry, then a hit; Flower answers, Prometheus scrapes every worker, and
`down -v` leaves nothing behind.

Its own project name and free ports, so it clashes with no compose farm already running;
the caller's PFBUILD_REDIS_URL and PFBUILD_REGISTRY point elsewhere on purpose: they must
not reach the containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pfbuild.worker.bench.localfarm import free_port
from tests.conftest import missing
from tests.fakes import drop_image

pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("compose")]

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
REPOS_ROOT = Path("/srv/repos")  # the compose file's repos root, mounted in the workers
WORKERS = 2
# Sized from what the test does on a 2-core machine that other tests load, not from a warm
# cache. A cold `up --build` makes four images from the base image (apt installs of
# redis-server, docker-registry and prometheus, pip installs of the worker and Flower):
# 2m13s measured, unloaded. The first submit builds examples/hello (apt and pip in its
# steps), saves its tarball and pushes it to an empty registry: 3m28s measured under a
# load of 10, with the apt layer cached. Then Prometheus' first scrapes (15 s apart).
UP_TIMEOUT = 900
BUILD_TIMEOUT = 900
TEST_TIMEOUT = UP_TIMEOUT + BUILD_TIMEOUT + 300  # + the hit, Flower, Prometheus, down


class Compose:
    """One compose project: `docker-compose -p NAME -f compose/docker-compose.yml ...`."""

    def __init__(self) -> None:
        self.project = f"pfbtest{uuid.uuid4().hex[:10]}"
        self.ports = {name: free_port() for name in ("redis", "registry", "flower", "prometheus")}
        self.env = {
            **os.environ,
            **{f"PFBUILD_COMPOSE_{k.upper()}_PORT": str(v) for k, v in self.ports.items()},
            # what an agent's shell exports: Redis and registry of .ci/setup, not compose's
            "PFBUILD_REDIS_URL": "redis://127.0.0.1:6379/0",
            "PFBUILD_REGISTRY": "127.0.0.1:5055",
            "PFBUILD_HOST_ID": "not-the-compose-host",
        }
        self.redis_url = f"redis://127.0.0.1:{self.ports['redis']}/0"

    def run(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        assert proc.returncode == 0, f"docker-compose {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of the project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
            out = subprocess.run(["docker", *kind, "-q", "--filter", label],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            found += [f"{kind[0]} {line}" for line in out.split()]
        return found


@pytest.fixture
def compose(docker_engine) -> Iterator[Compose]:  # type: ignore[no-untyped-def]
    """The farm, up; taken down (volumes too) whatever happens."""
    if shutil.which("docker-compose") is None:
        missing("docker-compose (apt-get install docker-compose; .ci/setup installs it)")
    farm = Compose()
    try:
        farm.run("up", "-d", "--build", "--scale", f"worker={WORKERS}", timeout=UP_TIMEOUT)
        yield farm
    finally:
        if farm.leftovers():
            farm.run("down", "-v", "--timeout", "20", timeout=180)


@pytest.fixture
def repo(compose: Compose) -> Iterator[Path]:
    """examples/hello under the repos root, with a profile nobody has built."""
    from tests.fakes import nonce_profile

    dest = REPOS_ROOT / compose.project / "hello"
    shutil.copytree(ROOT / "examples" / "hello", dest)
    (dest / "repo_profile.json").write_text(json.dumps(nonce_profile(dest)))
    yield dest
    shutil.rmtree(dest.parent, ignore_errors=True)


def _submit(compose: Compose, repo: Path) -> dict[str, Any]:
    """The README's compose submit, as an agent's shell runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pfbuild.client.cli", "submit", "--wait", "--json",
         "--repo-dir", str(repo), "--profile", str(repo / "repo_profile.json")],
        env={**compose.env, "PFBUILD_REDIS_URL": compose.redis_url},
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"{what} not seen in {timeout}s: {last!r}")


def _built_then_hit(compose: Compose, repo: Path, engine: Any) -> None:
    containers = compose.run("ps", "-q", "worker").split()
    assert len(containers) == WORKERS
    answer = _submit(compose, repo)
    try:
        assert answer["cache_source"] == "built"
        # a compose worker built it (its hostname is its container's short id) and pushed
        # it to the compose registry: the compose farm's settings, not the caller's
        assert answer["worker"].split("@")[-1].split(":")[0] in {c[:12] for c in containers}
        # the push follows the answer: the answer names it, pending, at the compose registry
        push = answer["manifest"]["publications"]["registry"]
        assert push["target"].startswith(f"127.0.0.1:{compose.ports['registry']}/")
        # the code's own tag and the profile's newest (pushed once the image is answered)
        code = answer["image_tag"].rpartition(":")[2]
        tags_url = (f"http://127.0.0.1:{compose.ports['registry']}/v2/"
                    f"patchfoundry/{answer['profile_id']}/tags/list")
        _wait_for("the pushed tags", lambda: sorted(json.loads(_get(tags_url))["tags"])
                  == sorted(["latest", code]), 300)
        again = _submit(compose, repo)
        assert again["cache_source"] == "local" and again["image_id"] == answer["image_id"]
    finally:
        drop_image(engine, answer["image_tag"])  # its code tag and :latest
        for tarball in Path("/srv/pfbuild/image-cache").glob(f"{answer['profile_id']}*"):
            tarball.unlink()


def _monitored(compose: Compose) -> None:
    """Flower answers; Prometheus scrapes every worker (found through the service's DNS)."""
    assert _wait_for("Flower", lambda: _get(
        f"http://127.0.0.1:{compose.ports['flower']}/healthcheck") == "OK", 60)

    def targets_up() -> bool:
        reply = json.loads(_get(
            f"http://127.0.0.1:{compose.ports['prometheus']}/api/v1/targets"))
        active = reply["data"]["activeTargets"]
        return len(active) == WORKERS and all(t["health"] == "up" for t in active)

    # discovery refreshes and scrapes every 15 s
    _wait_for("every worker up in Prometheus", targets_up, 90)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_compose_farm_as_the_readme_runs_it(compose: Compose, repo: Path,
                                            docker_engine) -> None:  # type: ignore[no-untyped-def]
    _built_then_hit(compose, repo, docker_engine)
    _monitored(compose)
    compose.run("down", "-v", "--timeout", "20", timeout=180)
    assert compose.leftovers() == []
