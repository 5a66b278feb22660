"""Shared fixtures: a real Docker engine, a real redis-server, sample repos.

A test that needs a real service skips when it is missing on a developer's machine, but
fails under ``CI=true``: CI must never pass by skipping the proof that a stage works.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pfbuild.client.settings import Settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BASE_IMAGE = "python:3.11-slim"


def missing(what: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def docker_engine():  # type: ignore[no-untyped-def]
    from pfbuild.client.errors import EngineUnavailable
    from pfbuild.worker.engine import DockerEngine

    try:
        engine = DockerEngine(Settings().docker_host_name(), timeout=600)
    except EngineUnavailable:
        missing("a Docker engine")
    if engine.inspect(BASE_IMAGE) is None:
        missing(f"the base image {BASE_IMAGE} (run `pfbuild base-image`)")
    return engine


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(tmp_dir=tmp_path / "pf-tmp", host_id="test-host")


@pytest.fixture
def unique_tag() -> str:
    """A profile id no other test (or earlier run) uses."""
    return f"pftest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def hello_repo(tmp_path: Path) -> Path:
    """A copy of the example repository, safe to write into."""
    dest = tmp_path / "hello"
    shutil.copytree(Path(__file__).parent.parent / "examples" / "hello", dest)
    return dest


@pytest.fixture
def cleanup_images(docker_engine) -> Iterator[list[str]]:  # type: ignore[no-untyped-def]
    """Tags appended here are removed after the test, with their profile's ``:latest``
    (an answer names its code tag; the build also moved ``:latest``)."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        docker_engine.remove(tag)
        docker_engine.remove(tag.rpartition(":")[0] + ":latest")


@pytest.fixture
def url() -> Iterator[str]:
    """A fake Redis server (fakeredis over TCP) for unit tests of queue logic."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="fake-redis", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"redis://{host!s}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


# --- many hosts: a second engine and a registry, stood up by .ci/hosts.sh --------------
# The defaults are the ones .ci/hosts.sh uses; set these variables to point elsewhere.
HOST_B_URL = os.environ.get("PFBUILD_TEST_HOST_B", "unix:///tmp/pfbuild-hostb/docker.sock")
REGISTRY_ADDR = os.environ.get("PFBUILD_TEST_REGISTRY", "127.0.0.1:5055")


@pytest.fixture(scope="session")
def host_b(docker_engine):  # type: ignore[no-untyped-def]
    """A second Docker engine ("host B") with the base image (`bash .ci/hosts.sh`)."""
    from pfbuild.worker.engine import DockerEngine

    engine = DockerEngine(HOST_B_URL, timeout=600)
    if not engine.ping():
        missing(f"a second Docker engine at {HOST_B_URL} (run `bash .ci/hosts.sh`)")
    if engine.inspect(BASE_IMAGE) is None:
        missing(f"the base image {BASE_IMAGE} on host B (run `bash .ci/hosts.sh`)")
    return engine


@pytest.fixture(scope="session")
def registry_addr() -> str:
    """host:port of a running Docker registry (`bash .ci/hosts.sh`)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{REGISTRY_ADDR}/v2/", timeout=5) as resp:
            resp.read()
    except OSError:
        missing(f"a Docker registry at {REGISTRY_ADDR} (run `bash .ci/hosts.sh`)")
    return REGISTRY_ADDR
