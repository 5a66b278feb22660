"""The engine adapter: step parsing, and a clear error when no engine answers."""

from __future__ import annotations

import time

import pytest

from pfbuild.client.errors import EngineUnavailable
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import DockerEngine, engine_from_settings, parse_step


@pytest.mark.parametrize(("line", "step"), [("Step 3/7 : RUN x", (3, 7)),
                                            (" ---> Using cache", None),
                                            ("Step 3/7", None)])
def test_parse_step(line: str, step: tuple[int, int] | None) -> None:
    assert parse_step(line) == step


def test_an_engine_that_is_not_there_is_engine_unavailable() -> None:
    with pytest.raises(EngineUnavailable, match="DOCKER_HOST"):
        DockerEngine("unix:///nonexistent/docker.sock", timeout=5)


@pytest.mark.docker
def test_inspect_a_missing_tag_is_none_and_the_base_image_is_found(docker_engine) -> None:  # type: ignore[no-untyped-def]
    assert docker_engine.inspect("patchfoundry/no-such-profile:latest") is None
    engine = engine_from_settings(Settings())
    base = engine.inspect("python:3.11-slim")
    assert base is not None and base.id.startswith("sha256:")


@pytest.mark.docker
def test_ping_with_a_timeout_answers(docker_engine) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    assert docker_engine.ping(timeout=3) and docker_engine.ping()
    assert time.monotonic() - started < 3


@pytest.mark.docker
def test_an_engine_gone_mid_build_is_engine_unavailable(docker_engine) -> None:  # type: ignore[no-untyped-def]
    """The build stream cut halfway (the engine's connection dropped) is the engine's
    failure, not an internal error; the engine stops the build it was running."""
    import threading
    import uuid

    from pfbuild.worker.engine import BuildSpec
    from tests.fakes import dockerfile_context
    from tests.hostsupport import engine_proxy

    marker = uuid.uuid4().hex
    lines: list[str] = []
    with engine_proxy(docker_engine) as proxy:
        engine = DockerEngine(proxy.url, timeout=60)
        dockerfile = f"FROM python:3.11-slim\nRUN echo {marker} && sleep 60\n"
        spec = BuildSpec(tag=f"pfgone/{marker}:latest", dockerfile="Dockerfile")

        def kill_when_running() -> None:
            deadline = time.monotonic() + 120
            while not any(marker in line for line in lines) and time.monotonic() < deadline:
                time.sleep(0.1)
            proxy.kill()

        killer = threading.Thread(target=kill_when_running)
        killer.start()
        with pytest.raises(EngineUnavailable, match="mid-build"):
            engine.build(dockerfile_context(dockerfile), spec, lines.append)
        killer.join()
    assert any(marker in line for line in lines)  # it was cut inside the RUN step
    assert docker_engine.inspect(spec.tag) is None
