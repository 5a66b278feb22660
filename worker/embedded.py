"""The embedded default: a broker and a worker inside the calling process.

With no ``PFBUILD_REDIS_URL``, ``pfbuild submit --wait`` needs no Redis: fakeredis serves
the Redis protocol on a loopback port and a threaded Celery worker runs the same task
code a real worker does, so the README's main command goes through the real queue path.

A hit needs none of that: :func:`answer_hit` asks the pipeline's own hit check
(:func:`pfbuild.worker.pipeline.reuse_local`: the profile's tag on the local engine, its
context digest label against the request's code) before anything starts. The farm's
worker answers a hit the same way, before any lock or record; everything else (a miss, a
forced rebuild, a tarball or registry copy to fetch) goes through the embedded queue,
under the profile lock.

A new image is published (its tarball saved) by a process of its own, started once the
answer is stored, which outlives the command (``Settings.publish_detached``; see
docs/design.md, "Publishing"): the command exits as soon as it has printed its answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pfbuild.client.settings import Settings

if TYPE_CHECKING:
    from pfbuild.client.models import BuildAnswer, BuildRequest

__all__ = ["answer_hit", "embedded_farm", "engine_hit_check", "fake_redis_server"]


def answer_hit(settings: Settings, request: BuildRequest) -> BuildAnswer | None:
    """The answer when the local engine's tag holds this very code, with no broker or
    worker started; None when something must be built (or fetched) under the lock.

    Raises what the worker's hit path raises: BadRequest for a request the worker would
    refuse, EngineUnavailable when the engine does not answer (the embedded farm has no
    other host to hand the job to)."""
    if request.force_rebuild:
        return None
    # imported here: the client's commands load this module without the docker SDK
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.pipeline import reuse_local
    from pfbuild.worker.publish import Pending, spawn_detached

    def finish(pending: Pending) -> None:
        # a publication of this very image that a killed publisher left pending: a
        # process of its own finishes it, as after a build, and the command exits
        spawn_detached(pending, settings.publish_niceness)

    resolved = resolve_request(request, settings)
    return reuse_local(resolved, settings, engine_from_settings(settings), handoff=finish)


def engine_hit_check(settings: Settings, answer: BuildAnswer) -> dict[str, Any] | None:
    """How the next identical command tells, before it loads itself, that the local engine
    still holds ``answer``'s image (``client/quickhit.py``): the engine and its API version,
    and this host's publication record of the profile as it is now. None while a
    publication of the profile is pending: such a hit is not remembered."""
    from pfbuild.client.quickhit import file_stat
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.publish import current, record_path

    record = str(record_path(settings, answer.profile_id))
    record_stat = file_stat(record)  # before it is read: a change after shows next time
    found = current(settings, answer.profile_id)
    if found is not None and found.pending:
        return None
    engine = engine_from_settings(settings)
    return {
        "engine": settings.docker_host_name(),
        "api_version": engine.api.api_version,
        "record": record,
        "record_stat": record_stat,
        "worker": settings.host_id,
    }


@contextmanager
def fake_redis_server() -> Iterator[str]:
    """fakeredis serving the Redis protocol on a free loopback port; yields its URL."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="pfbuild-fake-redis", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"redis://{host!s}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def embedded_farm(settings: Settings, concurrency: int = 2) -> Iterator[str]:
    """Yield the URL of an in-process Redis with a worker consuming from it."""
    from celery.contrib.testing.worker import start_worker

    from pfbuild.worker.celery_app import create_app

    with fake_redis_server() as url:
        # no metrics endpoint nor periodic collection for a one-shot, in-process farm; a
        # new image is published by a process of its own, which outlives the command
        quiet = settings.model_copy(
            update={"metrics_port": 0, "gc_interval_seconds": 0, "publish_detached": True}
        )
        app = create_app(quiet, url)
        worker = start_worker(
            app,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=5.0,
        )
        worker.__enter__()
        body_failed = True
        try:
            yield url
            body_failed = False
        finally:
            try:
                worker.__exit__(None, None, None)
            except RuntimeError:
                # a build still running in a worker thread (after a timeout or Ctrl-C):
                # the caller's own error is the one to report; the thread dies with us
                if not body_failed:
                    raise
